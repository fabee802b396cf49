//! Erasures an Object Lock held back: tracked in the repository, retried
//! once the locks run out, completed (and audited) when nothing of the
//! erased data is left.
//!
//! `customer erase` replaces every snapshot holding the customer's records
//! and deletes the old snapshot objects. On a target with Object Lock an old
//! snapshot (or a pack holding erased data) may be locked: nothing of it can
//! be deleted before its retain-until, and while the old snapshot exists its
//! data stays referenced. The erasure record (`erasures/<id>`) then lists
//! these objects as `pending`, with their retain-until.
//!
//! [`retry`] (run by `customer erase --retry-pending`, by `custos prune` and
//! by the daemon's `prune` jobs) takes every erasure that is not complete
//! and, once a pending object's retain-until has passed (by the clock passed
//! in), deletes the superseded snapshot objects for good (every version),
//! prunes (the erased blobs are forced out of mixed packs), and then checks
//! that no pack still holds an erased blob no snapshot uses. When none does,
//! the erasure is complete. Each retry that changes anything writes a
//! progress document to `erasures/` (what it removed, what is still locked
//! and until when, whether the erasure is complete); the latest one decides
//! an erasure's state.
//!
//! `retention apply` is tracked the same way: a disposal-log entry
//! (`disposals/<id>`) lists the replaced snapshots (and packs holding
//! disposed data) a lock kept, with their blobs; [`retry`] retries it like an
//! erasure and writes its progress documents to `disposals/` ([`Tracked`]).
//!
//! Snapshots an erasure (or `retention apply`) replaced are [`superseded`]:
//! a backup never takes one as its parent, and `locks extend` never extends
//! their locks, so they cannot bring erased records back or postpone the
//! erasure.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::disposal::DisposalDoc;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::ObjectKind;
use crate::prune::{PruneOptions, PruneReport};
use crate::repo::Repository;
use crate::rights::ErasureDoc;
use crate::target::{LockedObject, Purge};

/// What a tracked removal is: an erasure (`erasures/`) or a retention
/// disposal (`disposals/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tracked {
    Erasure,
    Disposal,
}

impl Tracked {
    /// The folder of its record and progress documents.
    fn kind(self) -> ObjectKind {
        match self {
            Tracked::Erasure => ObjectKind::Erasure,
            Tracked::Disposal => ObjectKind::Disposal,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Tracked::Erasure => "erasure",
            Tracked::Disposal => "disposal",
        }
    }
}

/// A progress document in `erasures/` (or `disposals/`): one retry of a
/// pending erasure (or retention disposal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureProgress {
    /// The erasure record (in `disposals/`: the disposal-log entry) this continues.
    pub erasure: Id,
    pub time: DateTime<Utc>,
    /// Objects deleted for good by this retry (on the target named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<LockedObject>,
    /// Objects an Object Lock still keeps, with their retain-until.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<LockedObject>,
    /// Packs that still hold erased data without a lock (waiting for a
    /// prune's grace period).
    #[serde(default)]
    pub packs_remaining: u64,
    /// Nothing of the erased data is left on any target.
    pub complete: bool,
}

/// What an `erasures/` object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ErasureObject {
    /// The record `customer erase` writes.
    Erasure(ErasureDoc),
    /// A later retry of it.
    Progress(ErasureProgress),
}

/// Every `erasures/` object: (erasure records oldest first, progress documents oldest first).
pub async fn load_all(
    repo: &Repository,
) -> Result<(Vec<(Id, ErasureDoc)>, Vec<(Id, ErasureProgress)>)> {
    let mut records = Vec::new();
    let mut progress = Vec::new();
    for id in repo.list_ids(ObjectKind::Erasure).await? {
        match repo
            .load_object::<ErasureObject>(ObjectKind::Erasure, &id)
            .await?
        {
            ErasureObject::Erasure(d) => records.push((id, d)),
            ErasureObject::Progress(p) => progress.push((id, p)),
        }
    }
    records.sort_by_key(|(_, d)| d.time);
    progress.sort_by_key(|(_, p)| p.time);
    Ok((records, progress))
}

/// An erasure's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Objects are still locked, or erased data still waits for a prune.
    Pending,
    /// Nothing was locked, or a retry found nothing of the erased data left.
    Complete,
}

/// One erasure (or disposal: `D` = [`DisposalDoc`]) with its state
/// (`customer log`, `retention log`).
#[derive(Debug, Clone, Serialize)]
pub struct Status<D = ErasureDoc> {
    pub id: Id,
    pub entry: D,
    pub state: State,
    /// When it became complete (the erasure's own time when nothing was locked).
    pub completed: Option<DateTime<Utc>>,
    /// The latest retry, if any.
    pub last_retry: Option<DateTime<Utc>>,
    /// What a lock still keeps, with retain-until (latest knowledge).
    pub pending: Vec<LockedObject>,
    /// Packs still holding erased data without a lock (as of the last retry).
    pub packs_remaining: u64,
}

/// Every erasure with its state, oldest first.
pub async fn statuses(repo: &Repository) -> Result<Vec<Status>> {
    let (records, progress) = load_all(repo).await?;
    Ok(records
        .into_iter()
        .map(|(id, entry)| {
            let (time, pending) = (entry.time, entry.pending.clone());
            status_of(id, entry, time, &pending, &progress)
        })
        .collect())
}

/// Every retention disposal with its state, oldest first: pending while a
/// lock keeps a replaced snapshot or a pack holding disposed data.
pub async fn disposal_statuses(repo: &Repository) -> Result<Vec<Status<DisposalDoc>>> {
    let (records, progress) = crate::disposal::load_all(repo).await?;
    Ok(records
        .into_iter()
        .map(|(id, entry)| {
            let (time, pending) = (entry.time, entry.pending.clone());
            status_of(id, entry, time, &pending, &progress)
        })
        .collect())
}

fn status_of<D>(
    id: Id,
    entry: D,
    time: DateTime<Utc>,
    recorded: &[LockedObject],
    progress: &[(Id, ErasureProgress)],
) -> Status<D> {
    let mine: Vec<&ErasureProgress> = progress
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.erasure == id)
        .collect();
    let done = mine.iter().find(|p| p.complete).map(|p| p.time);
    let latest = mine.last();
    let (state, completed, pending, packs_remaining) = match (done, latest) {
        (Some(t), _) => (State::Complete, Some(t), Vec::new(), 0),
        (None, Some(p)) => (State::Pending, None, p.pending.clone(), p.packs_remaining),
        (None, None) if recorded.is_empty() => (State::Complete, Some(time), vec![], 0),
        (None, None) => (State::Pending, None, recorded.to_vec(), 0),
    };
    Status {
        id,
        state,
        completed,
        last_retry: latest.map(|p| p.time),
        pending,
        packs_remaining,
        entry,
    }
}

/// Snapshots replaced by an erasure or by `retention apply` (the old ids):
/// they exist only while a lock keeps them and must not serve as a parent.
pub async fn superseded(repo: &Repository) -> Result<HashSet<Id>> {
    let mut out = HashSet::new();
    for (_, d) in load_all(repo).await?.0 {
        out.extend(d.snapshots.iter().map(|(old, _)| *old));
    }
    for (_, d) in crate::disposal::disposal_log(repo).await? {
        out.extend(d.snapshots.iter().map(|(old, _)| *old));
    }
    Ok(out)
}

/// One erasure (or disposal) a retry looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Retried {
    /// The erasure record or disposal-log entry.
    pub id: Id,
    pub kind: Tracked,
    pub state: State,
    /// Objects deleted for good now.
    pub removed: Vec<LockedObject>,
    /// What a lock still keeps.
    pub pending: Vec<LockedObject>,
    /// Packs still holding erased data without a lock (they go with a prune).
    pub packs_remaining: u64,
    /// Not looked at: every pending object is locked beyond `now`.
    pub not_due: bool,
    /// The progress document written, if anything changed.
    pub progress: Option<Id>,
}

/// What [`retry`] did.
#[derive(Debug, Default, Serialize)]
pub struct RetryReport {
    /// Erasures that were not complete.
    pub open: usize,
    pub erasures: Vec<Retried>,
    /// Erasures completed now.
    pub completed: Vec<Id>,
    /// Retention disposals that were not complete.
    pub disposals_open: usize,
    pub disposals: Vec<Retried>,
    /// Retention disposals completed now.
    pub disposals_completed: Vec<Id>,
    /// The prune runs of this retry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prune: Vec<PruneReport>,
    pub errors: Vec<String>,
}

impl RetryReport {
    /// Erasures or disposals were not complete.
    pub fn any_open(&self) -> bool {
        self.open > 0 || self.disposals_open > 0
    }

    /// Every erasure and disposal looked at.
    pub fn all(&self) -> impl Iterator<Item = &Retried> {
        self.erasures.iter().chain(&self.disposals)
    }

    /// Erasures and disposals completed now.
    pub fn all_completed(&self) -> impl Iterator<Item = &Retried> {
        self.all().filter(|r| match r.kind {
            Tracked::Erasure => self.completed.contains(&r.id),
            Tracked::Disposal => self.disposals_completed.contains(&r.id),
        })
    }

    fn push(&mut self, r: Retried) {
        match r.kind {
            Tracked::Erasure => self.erasures.push(r),
            Tracked::Disposal => self.disposals.push(r),
        }
    }
}

/// An erasure or disposal that is not complete, with its latest pending list.
struct Open {
    kind: Tracked,
    id: Id,
    /// The erased (disposed) blobs: none may stay in a pack unused.
    blobs: Vec<Id>,
    pending: Vec<LockedObject>,
    packs_remaining: u64,
}

async fn open_items(repo: &Repository) -> Result<Vec<Open>> {
    fn pending<T>(
        kind: Tracked,
        list: Vec<Status<T>>,
        blobs: fn(T) -> Vec<Id>,
    ) -> impl Iterator<Item = Open> {
        list.into_iter()
            .filter(|s| s.state == State::Pending)
            .map(move |s| Open {
                kind,
                id: s.id,
                pending: s.pending,
                packs_remaining: s.packs_remaining,
                blobs: blobs(s.entry),
            })
    }
    let erasures = pending(Tracked::Erasure, statuses(repo).await?, |e| e.blobs);
    let disposals = pending(Tracked::Disposal, disposal_statuses(repo).await?, |d| {
        d.blobs
    });
    Ok(erasures.chain(disposals).collect())
}

/// When [`retry`] prunes.
#[derive(Debug, Clone, Copy)]
pub enum PruneMode<'a> {
    /// Never: the data goes with the next prune.
    Never,
    /// When an erasure's superseded snapshots are gone (`customer erase
    /// --retry-pending`); a zero grace period prunes twice, so the packs
    /// marked now are deleted at once.
    WhenReady(&'a PruneOptions),
    /// Exactly once, whatever the erasures (`custos prune`, prune jobs).
    Always(&'a PruneOptions),
}

impl PruneMode<'_> {
    fn options(&self) -> Option<&PruneOptions> {
        match self {
            PruneMode::Never => None,
            PruneMode::WhenReady(o) | PruneMode::Always(o) => Some(o),
        }
    }
}

/// `prune` as `custos prune`, `forget --prune`, `retention apply` and the
/// daemon run it: the pending erasures and retention disposals whose locks
/// ran out by `now` are retried with it.
/// Returns the prune report and the retry's.
pub async fn prune_completing(
    repo: &Repository,
    opts: &PruneOptions,
    now: DateTime<Utc>,
) -> Result<(PruneReport, RetryReport)> {
    let mut r = retry(repo, now, PruneMode::Always(opts)).await?;
    let p = r.prune.pop().expect("PruneMode::Always prunes once");
    Ok((p, r))
}

/// Complete every pending erasure (and retention disposal) whose locks ran
/// out by `now`: delete the
/// superseded snapshot objects (every version), prune as `mode` says,
/// record the progress, and report the erasures completed now. With a dry
/// run prune nothing is changed.
pub async fn retry(
    repo: &Repository,
    now: DateTime<Utc>,
    mode: PruneMode<'_>,
) -> Result<RetryReport> {
    let dry_run = mode.options().is_some_and(|p| p.dry_run);
    if !dry_run {
        repo.require(crate::crypto::Role::Admin, "completing erasures")?;
    }
    let open = open_items(repo).await?;
    let mut report = RetryReport {
        open: open.iter().filter(|o| o.kind == Tracked::Erasure).count(),
        disposals_open: open.iter().filter(|o| o.kind == Tracked::Disposal).count(),
        ..Default::default()
    };
    // 1. Superseded snapshots whose lock ran out go first: while one exists
    //    its data is still referenced.
    let mut work = Vec::new();
    for o in open {
        let due = o.pending.is_empty() || o.pending.iter().any(|p| p.retain_until <= now);
        if !due {
            report.push(Retried {
                id: o.id,
                kind: o.kind,
                state: State::Pending,
                removed: Vec::new(),
                pending: o.pending,
                packs_remaining: o.packs_remaining,
                not_due: true,
                progress: None,
            });
            continue;
        }
        let mut removed = Vec::new();
        let mut still = Vec::new();
        let mut others = Vec::new();
        for p in &o.pending {
            if !p.object.starts_with("snapshots/") {
                // Packs and index objects: prune deletes them; re-checked below.
                others.push(p.clone());
                continue;
            }
            if p.retain_until > now || dry_run {
                still.push(p.clone());
                continue;
            }
            let Some(t) = repo.targets().iter().find(|t| t.name() == p.target) else {
                report.errors.push(format!(
                    "{} {}: target {} of {} is not configured (or unreachable); kept pending",
                    o.kind.word(),
                    o.id.short(),
                    p.target,
                    p.object
                ));
                still.push(p.clone());
                continue;
            };
            match t.purge(&p.object).await {
                Ok(Purge::Removed) => removed.push(p.clone()),
                Ok(Purge::Locked(until)) => still.push(LockedObject {
                    retain_until: until,
                    ..p.clone()
                }),
                Err(e) => {
                    report
                        .errors
                        .push(format!("{} {}: {e}", o.kind.word(), o.id.short()));
                    still.push(p.clone());
                }
            }
        }
        if !still.is_empty() {
            still.append(&mut others);
        }
        work.push((o, removed, still));
    }
    // 2. Prune once something can go (the erased blobs are forced out of
    //    mixed packs by every prune).
    let ready = work.iter().any(|(_, _, still)| still.is_empty());
    match mode {
        PruneMode::Never => {}
        PruneMode::Always(opts) => report.prune.push(crate::prune::prune(repo, opts).await?),
        PruneMode::WhenReady(opts) if ready => {
            report.prune.push(crate::prune::prune(repo, opts).await?);
            if opts.grace.is_zero() && !opts.dry_run {
                report.prune.push(crate::prune::prune(repo, opts).await?);
            }
        }
        PruneMode::WhenReady(_) => {}
    }
    // 3. What is left of each erasure's data.
    let mut left = None;
    for (o, removed, still) in work {
        let (mut pending, mut packs_remaining) = (still, o.packs_remaining);
        if pending.is_empty() {
            if left.is_none() {
                left = Some(Leftovers::load(repo).await?);
            }
            let l = left.as_ref().expect("loaded");
            let (locked, unlocked) = l.of(repo, &o.blobs, now, &mut report.errors).await;
            pending = locked;
            packs_remaining = unlocked;
        }
        let complete = pending.is_empty() && packs_remaining == 0;
        let changed = complete
            || !removed.is_empty()
            || packs_remaining != o.packs_remaining
            || key_set(&pending) != key_set(&o.pending);
        let mut progress = None;
        if changed && !dry_run {
            // Serialized as `ErasureObject::Progress` / `DisposalObject::Progress`.
            let doc = ErasureProgress {
                erasure: o.id,
                time: now,
                removed: removed.clone(),
                pending: pending.clone(),
                packs_remaining,
                complete,
            };
            let (id, results) = repo.save_object(repo.targets(), o.kind.kind(), &doc).await;
            for r in results {
                r?;
            }
            progress = Some(id);
        }
        if complete && !dry_run {
            match o.kind {
                Tracked::Erasure => report.completed.push(o.id),
                Tracked::Disposal => report.disposals_completed.push(o.id),
            }
        }
        report.push(Retried {
            id: o.id,
            kind: o.kind,
            state: if complete && !dry_run {
                State::Complete
            } else {
                State::Pending
            },
            removed,
            pending,
            packs_remaining,
            not_due: false,
            progress,
        });
    }
    Ok(report)
}

fn key_set(v: &[LockedObject]) -> BTreeSet<(String, String, DateTime<Utc>)> {
    v.iter()
        .map(|l| (l.target.clone(), l.object.clone(), l.retain_until))
        .collect()
}

/// The packs of the repository with the blobs each holds, and the blobs the
/// current snapshots use.
struct Leftovers {
    packs: Vec<(String, Vec<Id>)>,
    used: crate::prune::UsedBlobs,
}

impl Leftovers {
    async fn load(repo: &Repository) -> Result<Leftovers> {
        let (snapshots, warnings) = repo.snapshots().await?;
        if !warnings.is_empty() {
            return Err(Error::Failed(format!(
                "an erasure cannot be checked while a snapshot is unreadable: {}",
                warnings.join("; ")
            )));
        }
        let files = crate::prune::index_files(repo).await?;
        let index = crate::index::Index::from_files(files.iter().map(|(_, f)| f));
        let (used, _) = crate::prune::used_blobs(repo, &index, &snapshots).await?;
        let mut seen = HashSet::new();
        let mut packs = Vec::new();
        for (_, f) in &files {
            for p in &f.packs {
                if seen.insert(p.id) {
                    packs.push((p.object_name(), p.blobs.iter().map(|b| b.id).collect()));
                }
            }
        }
        Ok(Leftovers { packs, used })
    }

    /// The packs still holding one of the erased (disposed) `blobs` that no
    /// snapshot uses: (those a lock keeps, with retain-until; the number of others).
    async fn of(
        &self,
        repo: &Repository,
        blobs: &[Id],
        now: DateTime<Utc>,
        errors: &mut Vec<String>,
    ) -> (Vec<LockedObject>, u64) {
        let erased: HashSet<Id> = blobs
            .iter()
            .filter(|b| !self.used.contains(b))
            .copied()
            .collect();
        let mut locked = Vec::new();
        let mut unlocked = 0u64;
        for (name, blobs) in &self.packs {
            if !blobs.iter().any(|b| erased.contains(b)) {
                continue;
            }
            let mut kept = false;
            for t in repo.targets().iter().filter(|t| t.object_lock().is_some()) {
                match t.locked_until(name).await {
                    Ok(Some(until)) if until > now => {
                        kept = true;
                        locked.push(LockedObject {
                            target: t.name().to_string(),
                            object: name.clone(),
                            retain_until: until,
                        });
                    }
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if !kept {
                unlocked += 1;
            }
        }
        (locked, unlocked)
    }
}

/// The locked objects of a just-made erasure (or disposal) that hold its
/// data: the old snapshots the rewrite could not delete (`pending`), plus
/// (when none is left) the packs a lock keeps. Written as a progress
/// document when it adds packs.
pub(crate) async fn after_replace(
    repo: &Repository,
    kind: Tracked,
    id: Id,
    pending: &[LockedObject],
    blobs: &[Id],
    now: DateTime<Utc>,
) -> Result<Option<Id>> {
    if !pending.is_empty() || !repo.targets().iter().any(|t| t.object_lock().is_some()) {
        return Ok(None);
    }
    let mut errors = Vec::new();
    let (locked, _) = Leftovers::load(repo)
        .await?
        .of(repo, blobs, now, &mut errors)
        .await;
    if let Some(e) = errors.first() {
        return Err(Error::Failed(e.clone()));
    }
    if locked.is_empty() {
        return Ok(None);
    }
    let progress = ErasureProgress {
        erasure: id,
        time: now,
        removed: Vec::new(),
        pending: locked,
        packs_remaining: 0,
        complete: false,
    };
    let (pid, results) = repo
        .save_object(repo.targets(), kind.kind(), &progress)
        .await;
    for r in results {
        r?;
    }
    Ok(Some(pid))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ops::Range;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use bytes::Bytes;

    use crate::repo::InitOptions;
    use crate::target::store::StoreTarget;
    use crate::target::{LockMode, ObjectLock, ObjectMeta, PutOutcome, Target, TargetRef};

    /// A memory target that enforces Object Lock by a clock the test sets:
    /// every object written gets retain-until = clock + period.
    #[derive(Debug)]
    pub(crate) struct Locking {
        inner: TargetRef,
        pub clock: Mutex<DateTime<Utc>>,
        pub locks: Mutex<HashMap<String, DateTime<Utc>>>,
        period: std::time::Duration,
    }

    impl Locking {
        pub(crate) fn new(now: DateTime<Utc>, period: std::time::Duration) -> Arc<Locking> {
            Arc::new(Locking {
                inner: Arc::new(StoreTarget::memory("locked")),
                clock: Mutex::new(now),
                locks: Mutex::default(),
                period,
            })
        }
        pub(crate) fn set_clock(&self, t: DateTime<Utc>) {
            *self.clock.lock().unwrap() = t;
        }
        fn now(&self) -> DateTime<Utc> {
            *self.clock.lock().unwrap()
        }
        fn lock(&self, object: &str) {
            if crate::target::lockable(object) {
                let until = self.now() + chrono::Duration::from_std(self.period).unwrap();
                self.locks.lock().unwrap().insert(object.into(), until);
            }
        }
        fn held(&self, object: &str) -> Option<DateTime<Utc>> {
            let now = self.now();
            self.locks
                .lock()
                .unwrap()
                .get(object)
                .copied()
                .filter(|u| *u > now)
        }
    }

    #[async_trait]
    impl Target for Locking {
        fn name(&self) -> &str {
            "locked"
        }
        fn location(&self) -> &str {
            "memory (locked)"
        }
        async fn put_new(&self, object: &str, data: Bytes) -> crate::Result<PutOutcome> {
            let r = self.inner.put_new(object, data).await?;
            if r == PutOutcome::Created {
                self.lock(object);
            }
            Ok(r)
        }
        async fn overwrite(&self, object: &str, data: Bytes) -> crate::Result<()> {
            self.inner.overwrite(object, data).await?;
            self.lock(object);
            Ok(())
        }
        async fn get(&self, object: &str) -> crate::Result<Bytes> {
            self.inner.get(object).await
        }
        async fn get_range(&self, object: &str, range: Range<u64>) -> crate::Result<Bytes> {
            self.inner.get_range(object, range).await
        }
        async fn list(&self, prefix: &str) -> crate::Result<Vec<ObjectMeta>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, object: &str) -> crate::Result<()> {
            if self.held(object).is_some() {
                return Err(Error::Failed(format!("{object}: locked")));
            }
            self.inner.delete(object).await
        }
        async fn purge(&self, object: &str) -> crate::Result<Purge> {
            if let Some(until) = self.held(object) {
                return Ok(Purge::Locked(until));
            }
            self.inner.delete(object).await?;
            self.locks.lock().unwrap().remove(object);
            Ok(Purge::Removed)
        }
        fn object_lock(&self) -> Option<ObjectLock> {
            Some(ObjectLock {
                mode: LockMode::Compliance,
                period: self.period,
            })
        }
        async fn locked_until(&self, object: &str) -> crate::Result<Option<DateTime<Utc>>> {
            Ok(self.held(object))
        }
        async fn extend_lock(&self, object: &str, until: DateTime<Utc>) -> crate::Result<()> {
            let mut l = self.locks.lock().unwrap();
            let e = l.entry(object.into()).or_insert(until);
            *e = (*e).max(until);
            Ok(())
        }
    }

    pub(crate) async fn repo_on(t: TargetRef) -> Repository {
        let opts = InitOptions {
            kdf: crate::keyfile::KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        Repository::init(vec![t], b"pw", &opts).await.unwrap()
    }

    /// Back up `lines` (JSON objects with `id`, `ts`, `email`, `subject`,
    /// `text`) as the jsonl source `chat`.
    pub(crate) async fn backup_lines(repo: &Repository, dir: &std::path::Path, lines: &[String]) {
        std::fs::write(dir.join("chat.jsonl"), lines.join("\n") + "\n").unwrap();
        backup_again(repo, dir).await;
    }

    /// Back up the jsonl source `chat` as it is on disk.
    pub(crate) async fn backup_again(repo: &Repository, dir: &std::path::Path) {
        let path = dir.join("chat.jsonl");
        let connector =
            custos_connectors::files::JsonlConnector::new(custos_connectors::files::JsonlConfig {
                name: "chat".into(),
                path,
                id_field: "id".into(),
                time_field: Some("ts".into()),
                customer_fields: vec!["email:email".into()],
                subject_field: Some("subject".into()),
                text_field: Some("text".into()),
                jurisdiction_field: None,
                kind: "chat_message".into(),
            })
            .unwrap();
        let opts = crate::records::RecordBackupOptions {
            source: "chat".into(),
            source_type: "jsonl".into(),
            mode: crate::records::Mode::Archive,
            tags: Vec::new(),
            hostname: "test".into(),
            time_zone: "UTC".into(),
            reconcile_every: None,
            full: false,
            index_mentions: false,
            jurisdiction: None,
            state_memory: crate::records::STATE_MEMORY,
        };
        crate::records::backup_records(repo, &connector, &opts, Default::default())
            .await
            .unwrap();
    }

    pub(crate) fn line(id: &str, email: &str, subject: &str) -> String {
        serde_json::json!({
            "id": id, "ts": "2026-03-03T10:00:00Z", "email": email,
            "subject": subject, "text": format!("body of {id} {subject}"),
        })
        .to_string()
    }

    /// Decrypted blobs of every pack on `t` containing `needle`: (pack, blob).
    pub(crate) async fn hits(repo: &Repository, t: &TargetRef, needle: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for prefix in ["data/", "tree/"] {
            for m in t.list(prefix).await.unwrap() {
                let bytes = t.get(&m.name).await.unwrap();
                for e in crate::pack::read_header(repo.keys(), &m.name, &bytes).unwrap() {
                    let sealed = &bytes[e.offset as usize..(e.offset + e.length) as usize];
                    if e.ty == crate::blob::BlobType::Data {
                        repo.ensure_data_keys([sealed]).await.unwrap();
                    }
                    let plain = crate::pack::decode_entry(repo.keys(), &e, &bytes).unwrap();
                    if plain.windows(needle.len()).any(|w| w == needle) {
                        out.push(format!("{} blob {}", m.name, e.id));
                    }
                }
            }
        }
        out
    }

    fn ana() -> BTreeSet<String> {
        ["email:ana@example.org".to_string()].into_iter().collect()
    }

    const CANARY: &str = "CANARY-ANA-LOCKED";

    #[tokio::test]
    async fn a_locked_erasure_is_pending_until_the_locks_run_out_then_completes() {
        let t0 = Utc::now();
        let hour = chrono::Duration::hours(1);
        let lock = Locking::new(t0, std::time::Duration::from_secs(3600));
        let t: TargetRef = lock.clone();
        let repo = repo_on(t.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            line("a1", "ana@example.org", CANARY),
            line("b1", "bo@example.org", "from bo"),
            line("c1", "cy@example.org", "from cy"),
        ];
        backup_lines(&repo, dir.path(), &lines).await;
        assert!(!hits(&repo, &t, CANARY.as_bytes()).await.is_empty());

        let r = crate::rights::erase(
            &repo,
            "ana",
            &ana(),
            "request 1",
            false,
            Some(std::time::Duration::ZERO),
        )
        .await
        .unwrap();
        let id = r.erasure_log.unwrap();
        assert_eq!(r.locked.len(), 1, "{:?}", r.locked);
        let old_snapshot = r.locked[0].object.clone();
        assert!(old_snapshot.starts_with("snapshots/"), "{old_snapshot}");
        assert_eq!(r.locked[0].retain_until, t0 + hour);
        let st = statuses(&repo).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].state, State::Pending);
        assert_eq!(st[0].pending, r.locked);
        // The old snapshot still references the canary: it is not gone yet.
        assert!(!hits(&repo, &t, CANARY.as_bytes()).await.is_empty());
        assert!(superseded(&repo)
            .await
            .unwrap()
            .contains(&Id::from_hex(old_snapshot.trim_start_matches("snapshots/")).unwrap()));

        // A backup meanwhile (the source unchanged: its tree is carried over
        // from the parent) never takes the superseded snapshot as its parent,
        // so Ana's record is not carried into the new snapshot.
        backup_again(&repo, dir.path()).await;
        let (blob_index, _) = repo.load_index().await.unwrap();
        let (snaps, _) = repo.snapshots().await.unwrap();
        let newest = snaps.iter().max_by_key(|s| s.snapshot.time).unwrap();
        for p in crate::customer::partitions(&repo, &blob_index, &newest.snapshot.tree)
            .await
            .unwrap()
        {
            let nodes = repo.load_tree(&blob_index, &p.tree).await.unwrap();
            assert!(nodes.iter().all(|n| !n.name.starts_with("a1")), "{nodes:?}");
        }

        let grace0 = crate::prune::PruneOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        };
        // Before the retain-until: nothing is tried, nothing is written.
        let before = repo.list_ids(ObjectKind::Erasure).await.unwrap().len();
        lock.set_clock(t0 + hour / 2);
        let r1 = retry(&repo, t0 + hour / 2, PruneMode::WhenReady(&grace0))
            .await
            .unwrap();
        assert_eq!((r1.open, r1.completed.len()), (1, 0));
        assert!(r1.erasures[0].not_due && r1.prune.is_empty());
        assert_eq!(
            repo.list_ids(ObjectKind::Erasure).await.unwrap().len(),
            before
        );
        assert!(t.get(&old_snapshot).await.is_ok());

        // Someone extended the lock: the retry after the recorded date finds
        // it still locked and records the new date.
        lock.set_clock(t0 + hour * 2);
        t.extend_lock(&old_snapshot, t0 + hour * 3).await.unwrap();
        let r2 = retry(&repo, t0 + hour * 2, PruneMode::WhenReady(&grace0))
            .await
            .unwrap();
        assert!(r2.completed.is_empty());
        assert_eq!(r2.erasures[0].pending[0].retain_until, t0 + hour * 3);
        assert!(r2.erasures[0].progress.is_some());
        let st = statuses(&repo).await.unwrap();
        assert_eq!(st[0].state, State::Pending);
        assert_eq!(st[0].pending[0].retain_until, t0 + hour * 3);

        // After it: the old snapshot goes, prune forces the erased blobs out,
        // the erasure is complete and no byte of the canary is left.
        lock.set_clock(t0 + hour * 4);
        let r3 = retry(&repo, t0 + hour * 4, PruneMode::WhenReady(&grace0))
            .await
            .unwrap();
        assert_eq!(r3.completed, vec![id], "{r3:?}");
        assert_eq!(r3.erasures[0].removed.len(), 1);
        assert_eq!(r3.erasures[0].removed[0].object, old_snapshot);
        assert!(t.get(&old_snapshot).await.is_err());
        assert_eq!(
            hits(&repo, &t, CANARY.as_bytes()).await,
            Vec::<String>::new()
        );
        let st = statuses(&repo).await.unwrap();
        assert_eq!(st[0].state, State::Complete);
        assert_eq!(st[0].completed, Some(t0 + hour * 4));
        // Nothing left to do; the erasure log still lists one erasure.
        let r4 = retry(&repo, t0 + hour * 5, PruneMode::WhenReady(&grace0))
            .await
            .unwrap();
        assert_eq!(r4.open, 0);
        assert_eq!(crate::rights::erasure_log(&repo).await.unwrap().len(), 1);
        // Bo and Cy are still there.
        let bo: BTreeSet<String> = ["email:bo@example.org".to_string()].into_iter().collect();
        let show = crate::rights::show(&repo, "bo", &bo).await.unwrap();
        assert_eq!(show.records, 1);
    }

    #[test]
    fn an_erasure_without_locks_is_complete_and_progress_decides_otherwise() {
        let doc = |pending: Vec<LockedObject>| ErasureDoc {
            time: Utc::now(),
            reason: "r".into(),
            customers: vec![],
            removed: Default::default(),
            held: 0,
            snapshots: vec![],
            targets: vec![],
            blobs: vec![],
            pending,
        };
        let lo = LockedObject {
            target: "s3".into(),
            object: "snapshots/ab".into(),
            retain_until: Utc::now(),
        };
        let id = Id([1; 32]);
        let st = |d: ErasureDoc, p: &[(Id, ErasureProgress)]| {
            let (time, pending) = (d.time, d.pending.clone());
            status_of(id, d, time, &pending, p)
        };
        let s = st(doc(vec![]), &[]);
        assert_eq!(
            (s.state, s.completed),
            (State::Complete, Some(s.entry.time))
        );
        let s = st(doc(vec![lo.clone()]), &[]);
        assert_eq!(s.state, State::Pending);
        assert_eq!(s.pending, vec![lo.clone()]);
        let progress = |complete: bool, t: DateTime<Utc>| {
            (
                Id([2; 32]),
                ErasureProgress {
                    erasure: id,
                    time: t,
                    removed: vec![],
                    pending: vec![],
                    packs_remaining: u64::from(!complete),
                    complete,
                },
            )
        };
        let t = Utc::now();
        let s = st(doc(vec![lo.clone()]), &[progress(false, t)]);
        assert_eq!(
            (s.state, s.packs_remaining, s.last_retry),
            (State::Pending, 1, Some(t))
        );
        let s = st(
            doc(vec![lo.clone()]),
            &[progress(false, t), progress(true, t)],
        );
        assert_eq!((s.state, s.completed), (State::Complete, Some(t)));
        // Another erasure's progress does not count.
        let d = doc(vec![lo.clone()]);
        let s = status_of(Id([9; 32]), d.clone(), d.time, &[lo], &[progress(true, t)]);
        assert_eq!(s.state, State::Pending);
        // Both documents round-trip through the untagged enum.
        let j = serde_json::to_string(&ErasureObject::Progress(progress(true, t).1)).unwrap();
        assert!(matches!(
            serde_json::from_str::<ErasureObject>(&j).unwrap(),
            ErasureObject::Progress(_)
        ));
        let j = serde_json::to_string(&doc(vec![])).unwrap();
        assert!(!j.contains("pending"), "{j}");
        assert!(matches!(
            serde_json::from_str::<ErasureObject>(&j).unwrap(),
            ErasureObject::Erasure(_)
        ));
    }
}
