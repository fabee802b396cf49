//! [`Memo`]: whole tree packs held in memory, up to a byte budget, for one
//! read-only walk over many trees.
//!
//! `check` walks every tree of every snapshot on one target, without the
//! metadata cache (it must report what that target holds). Read blob by blob
//! that is one ranged request per tree — 411 sequential GETs for the 1 GiB
//! benchmark corpus on S3 — where the trees sit in a handful of packs. With
//! this wrapper each tree pack is fetched once and its trees are sliced from
//! memory. Nothing is verified here that a ranged read would not verify: each
//! tree is an AEAD-sealed blob, authenticated and its id recomputed when it is
//! opened; `check --read-data` hashes whole packs on its own.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{whole_range, ByteStream, ObjectMeta, PutOutcome, Target, TargetRef};
use crate::error::Result;

/// In-memory tree-pack wrapper around a target (see the module docs).
#[derive(Debug)]
pub struct Memo {
    inner: TargetRef,
    budget: u64,
    used: AtomicU64,
    packs: Mutex<HashMap<String, Bytes>>,
}

impl Memo {
    /// Wrap `inner`, holding at most `budget` bytes of tree packs.
    pub fn wrap(inner: TargetRef, budget: u64) -> TargetRef {
        Arc::new(Memo {
            inner,
            budget,
            used: AtomicU64::new(0),
            packs: Mutex::default(),
        })
    }

    fn held(&self, object: &str) -> Option<Bytes> {
        self.packs.lock().expect("memo lock").get(object).cloned()
    }
}

/// `range` of `whole`, if it lies inside it.
fn slice(whole: &Bytes, range: &Range<u64>) -> Option<Bytes> {
    let (s, e) = (
        usize::try_from(range.start).ok()?,
        usize::try_from(range.end).ok()?,
    );
    (s <= e && e <= whole.len()).then(|| whole.slice(s..e))
}

#[async_trait]
impl Target for Memo {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn location(&self) -> &str {
        self.inner.location()
    }
    async fn put_new(&self, object: &str, data: Bytes) -> Result<PutOutcome> {
        self.inner.put_new(object, data).await
    }
    async fn overwrite(&self, object: &str, data: Bytes) -> Result<()> {
        self.packs.lock().expect("memo lock").remove(object);
        self.inner.overwrite(object, data).await
    }
    async fn get(&self, object: &str) -> Result<Bytes> {
        match self.held(object) {
            Some(d) => Ok(d),
            None => self.inner.get(object).await,
        }
    }
    async fn get_range_stream(&self, object: &str, range: Range<u64>) -> Result<ByteStream> {
        if !object.starts_with("tree/") {
            return self.inner.get_range_stream(object, range).await;
        }
        whole_range(self, object, range).await
    }
    async fn get_range(&self, object: &str, range: Range<u64>) -> Result<Bytes> {
        if !object.starts_with("tree/") {
            return self.inner.get_range(object, range).await;
        }
        if let Some(d) = self.held(object).and_then(|w| slice(&w, &range)) {
            return Ok(d);
        }
        if self.used.load(Ordering::Relaxed) < self.budget {
            // A failed whole read falls through to the ranged read, which
            // reports the error as it would without this wrapper.
            if let Ok(whole) = self.inner.get(object).await {
                let len = whole.len() as u64;
                if self.used.fetch_add(len, Ordering::Relaxed) + len <= self.budget {
                    self.packs
                        .lock()
                        .expect("memo lock")
                        .insert(object.to_string(), whole.clone());
                } else {
                    self.used.fetch_sub(len, Ordering::Relaxed);
                }
                if let Some(d) = slice(&whole, &range) {
                    return Ok(d);
                }
            }
        }
        self.inner.get_range(object, range).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectMeta>> {
        self.inner.list_after(prefix, start_after, limit).await
    }
    async fn delete(&self, object: &str) -> Result<()> {
        self.packs.lock().expect("memo lock").remove(object);
        self.inner.delete(object).await
    }
    async fn purge(&self, object: &str) -> Result<super::Purge> {
        self.packs.lock().expect("memo lock").remove(object);
        self.inner.purge(object).await
    }
    fn object_lock(&self) -> Option<super::ObjectLock> {
        self.inner.object_lock()
    }
    async fn locked_until(&self, object: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.inner.locked_until(object).await
    }
    async fn extend_lock(&self, object: &str, until: chrono::DateTime<chrono::Utc>) -> Result<()> {
        self.inner.extend_lock(object, until).await
    }
    async fn check_immutability(&self) -> Result<super::Immutability> {
        self.inner.check_immutability().await
    }
    async fn sweep_staging(
        &self,
        older_than: std::time::Duration,
        dry_run: bool,
    ) -> Result<Vec<ObjectMeta>> {
        self.inner.sweep_staging(older_than, dry_run).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::store::StoreTarget;

    #[tokio::test]
    async fn tree_packs_are_read_once_within_the_budget() {
        let inner: TargetRef = Arc::new(StoreTarget::memory("m"));
        let a = Bytes::from(vec![1u8; 1000]);
        let b = Bytes::from(vec![2u8; 1000]);
        inner.put_new("tree/aa/a", a.clone()).await.unwrap();
        inner.put_new("tree/bb/b", b.clone()).await.unwrap();
        inner.put_new("data/cc/c", a.clone()).await.unwrap();
        let t = Memo::wrap(inner.clone(), 1500);
        assert_eq!(t.get_range("tree/aa/a", 10..20).await.unwrap(), &a[10..20]);
        // Held: served from memory once the store has lost it.
        inner.delete("tree/aa/a").await.unwrap();
        assert_eq!(t.get_range("tree/aa/a", 0..5).await.unwrap(), &a[..5]);
        // Past the budget: read as ranges, not held.
        assert_eq!(t.get_range("tree/bb/b", 0..5).await.unwrap(), &b[..5]);
        inner.delete("tree/bb/b").await.unwrap();
        assert!(t
            .get_range("tree/bb/b", 0..5)
            .await
            .unwrap_err()
            .is_not_found());
        // Content packs are never held.
        assert_eq!(t.get_range("data/cc/c", 0..5).await.unwrap(), &a[..5]);
        inner.delete("data/cc/c").await.unwrap();
        assert!(t.get_range("data/cc/c", 0..5).await.is_err());
        // A range outside the held object goes to the store (and fails there).
        assert!(t.get_range("tree/aa/a", 900..1100).await.is_err());
    }
}
