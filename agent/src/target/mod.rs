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
    /// List all objects whose name starts with `prefix` (a folder like `index/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Delete an object (missing objects are not an error).
    async fn delete(&self, object: &str) -> Result<()>;
}

/// Shared handle to a target.
pub type TargetRef = Arc<dyn Target>;
