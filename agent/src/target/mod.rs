//! Storage targets: where repository objects live.
//!
//! One small trait, [`Target`], with one implementation over `object_store`
//! ([`store::StoreTarget`]: local directory, S3-compatible, in-memory) and
//! wrappers that add behaviour without flags: [`limit::Limited`]
//! (concurrency and bandwidth limits) and [`cache::Cached`] (local cache of
//! metadata objects). The conformance suite in `tests/` runs every target
//! kind through the same checks.
//!
//! Objects are immutable: [`Target::put_new`] is a create-only write
//! (`If-None-Match: *` on S3, no-replace rename on local disks). Content-
//! addressed names make "already exists" a success for writers.

pub mod cache;
pub mod limit;
pub mod localfile;
pub mod memo;
#[cfg(test)]
pub mod recording;
pub mod s3api;
pub mod store;

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Object name relative to the repository root (`data/ab/ab12…`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Last-Modified as the store reports it (the store's clock).
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Result of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Created,
    /// An object of that name existed; nothing was written.
    AlreadyExists,
}

/// Object Lock retention mode (S3 semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten.
    Governance,
    /// Nobody can delete the version or shorten its retention, not even root.
    Compliance,
}

/// `object_lock = { mode, period }` of a target: every repository object is
/// written with retain-until = now + period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub period: std::time::Duration,
}

impl ObjectLock {
    /// Retain-until for an object written at `now`.
    pub fn until(&self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        now + chrono::Duration::from_std(self.period).unwrap_or(chrono::Duration::MAX)
    }
}

/// Is `object` repository data that gets a retain-until on a locked target?
/// Scratch objects (clock probes, lock canaries) and prune marks are not
/// locked: prune must be able to delete a carried-out mark.
pub fn lockable(object: &str) -> bool {
    !(object.starts_with("probes/") || object.starts_with("marks/"))
}

/// Result of [`Target::purge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// Gone: on a versioned bucket every version and delete marker too.
    Removed,
    /// Kept: a retention or legal hold protects a version until then
    /// (`DateTime::MAX_UTC` for a legal hold). Nothing was deleted.
    Locked(chrono::DateTime<chrono::Utc>),
}

/// An object a lock kept (prune, forget, erasures).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockedObject {
    pub target: String,
    pub object: String,
    /// Retain-until of the protecting lock (far future for a legal hold).
    pub retain_until: chrono::DateTime<chrono::Utc>,
}

/// What `custos targets check` found out about a target's immutability.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Immutability {
    pub target: String,
    /// S3 bucket versioning: `enabled`, `suspended`, `off`; null when not S3.
    pub versioning: Option<String>,
    /// Object Lock enabled on the bucket.
    pub bucket_object_lock: bool,
    /// The configured `object_lock` (mode), null when none.
    pub object_lock_mode: Option<LockMode>,
    /// The configured `object_lock` period in seconds, null when none.
    pub object_lock_period_secs: Option<u64>,
    /// True only when a locked canary version could not be deleted.
    pub immutable: bool,
    /// What was tried and what happened.
    pub detail: String,
}

/// A place that stores repository objects.
#[async_trait]
pub trait Target: Send + Sync + Debug {
    /// The configured name (used in every message about this target).
    fn name(&self) -> &str;
    /// Where it is, for humans (URL without credentials).
    fn location(&self) -> &str;
    /// Create-only write of a whole object.
    async fn put_new(&self, object: &str, data: Bytes) -> Result<PutOutcome>;
    /// Replace an object's bytes (repair only: rewrites verified bytes under the same name).
    async fn overwrite(&self, object: &str, data: Bytes) -> Result<()>;
    /// Read a whole object.
    async fn get(&self, object: &str) -> Result<Bytes>;
    /// Read a byte range of an object.
    async fn get_range(&self, object: &str, range: Range<u64>) -> Result<Bytes>;
    /// Read a byte range as a stream of chunks, in order, for reads of whole
    /// packs (restore): the reader works on what has arrived and holds a few
    /// MiB instead of the range. The default reads the range whole, which
    /// is right for wrappers that must see the bytes (limits, caches) and
    /// for local files (read from the page cache at once).
    async fn get_range_stream(&self, object: &str, range: Range<u64>) -> Result<ByteStream> {
        whole_range(self, object, range).await
    }
    /// List all objects whose name starts with `prefix` (a folder like `index/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// List objects under `prefix` whose names sort after `start_after`, at
    /// most `limit` of them (None: all), in no particular order. S3 starts
    /// the listing there (`StartAfter`), so the cost is what is returned;
    /// other stores may filter a full listing.
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectMeta>> {
        let mut v = self.list(prefix).await?;
        v.retain(|m| m.name.as_str() > start_after);
        if let Some(l) = limit {
            v.truncate(l);
        }
        Ok(v)
    }
    /// Delete an object (missing objects are not an error). On a versioned
    /// bucket this only hides it (delete marker): use [`Target::purge`] to
    /// free space.
    async fn delete(&self, object: &str) -> Result<()>;

    /// Delete an object for good: on a versioned bucket every version and
    /// delete marker of it. When a lock protects a version nothing is
    /// deleted and the retain-until is returned.
    async fn purge(&self, object: &str) -> Result<Purge> {
        self.delete(object).await.map(|()| Purge::Removed)
    }

    /// Staging files last written more than `older_than` ago, left by a
    /// writer that died between writing and publishing an object (a local
    /// directory stages `NAME#N` before it takes `NAME`): removed unless
    /// `dry_run`, and returned. Listings never show them, so nothing else
    /// removes them. Stores that publish atomically (S3, memory) have none.
    async fn sweep_staging(
        &self,
        _older_than: std::time::Duration,
        _dry_run: bool,
    ) -> Result<Vec<ObjectMeta>> {
        Ok(Vec::new())
    }

    /// The configured Object Lock of this target, if any.
    fn object_lock(&self) -> Option<ObjectLock> {
        None
    }

    /// Until when a lock protects the object's current version (None: not
    /// protected, or the target has no locks).
    async fn locked_until(&self, _object: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        Ok(None)
    }

    /// Set the current version's retain-until to `until` (never shortens).
    async fn extend_lock(&self, object: &str, _until: chrono::DateTime<chrono::Utc>) -> Result<()> {
        Err(crate::error::Error::Invalid(format!(
            "target {}: {object}: no object lock on this target",
            self.name()
        )))
    }

    /// Prove (or disprove) that the target enforces locks: write a locked
    /// canary and try to delete its version.
    async fn check_immutability(&self) -> Result<Immutability> {
        Ok(Immutability {
            target: self.name().to_string(),
            detail: "not an S3 target: nothing stops deletion".into(),
            ..Default::default()
        })
    }
}

/// Chunks of an object being read ([`Target::get_range_stream`]); an error
/// ends it.
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes>>;

/// A range of `t`'s object read whole, as a one-chunk [`ByteStream`]: the
/// default of [`Target::get_range_stream`], for wrappers and stores that
/// override it for some objects only.
pub async fn whole_range<T: Target + ?Sized>(
    t: &T,
    object: &str,
    range: Range<u64>,
) -> Result<ByteStream> {
    let data = t.get_range(object, range).await?;
    Ok(Box::pin(futures::stream::once(async move { Ok(data) })))
}

/// Shared handle to a target.
pub type TargetRef = Arc<dyn Target>;

/// Packs (or pack regions) to read at once from `target` in restore and
/// `check --read-data`. From a local directory 2 keep both cores decoding:
/// reads do not wait on a network, and every pack in flight holds a
/// multi-MiB buffer (restore: 2 as fast as 4 with ~40 % less peak RSS). A
/// network store needs more requests in flight to hide its latency (1 GiB
/// check from SeaweedFS on loopback: 1.63–1.66 s with 2, 1.51–1.58 s with 4
/// for ~35 MiB more peak RSS, 6 no better; bench/README.md, Findings).
pub fn pack_read_concurrency(target: &dyn Target) -> usize {
    if target.location().starts_with('/') {
        2
    } else {
        4
    }
}
