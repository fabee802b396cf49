//! [`Limited`]: a target wrapper that bounds concurrent requests and
//! upload/download bandwidth (token bucket), so a sidecar does not saturate a
//! shared link.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore};

use super::{ObjectMeta, PutOutcome, Target, TargetRef};
use crate::error::Result;

/// A token bucket over bytes per second; debt is paid by sleeping.
#[derive(Debug)]
pub struct Bandwidth {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bandwidth {
    /// `bytes_per_sec` sustained, with one second of burst.
    pub fn new(bytes_per_sec: u64) -> Self {
        Bandwidth {
            rate: bytes_per_sec.max(1) as f64,
            state: Mutex::new((bytes_per_sec as f64, Instant::now())),
        }
    }

    /// Take `n` bytes of allowance, sleeping while the bucket is in debt.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.rate) - n as f64;
            s.1 = now;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Limits on one target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Maximum requests in flight (0 = unlimited).
    pub max_concurrency: usize,
    /// Upload bytes per second (None = unlimited).
    pub upload_bps: Option<u64>,
    /// Download bytes per second (None = unlimited).
    pub download_bps: Option<u64>,
}

/// Wrapper applying [`Limits`].
#[derive(Debug)]
pub struct Limited {
    inner: TargetRef,
    permits: Option<Semaphore>,
    up: Option<Bandwidth>,
    down: Option<Bandwidth>,
}

impl Limited {
    /// Wrap `inner`; returns it unchanged when no limit is set.
    pub fn wrap(inner: TargetRef, limits: Limits) -> TargetRef {
        if limits.max_concurrency == 0
            && limits.upload_bps.is_none()
            && limits.download_bps.is_none()
        {
            return inner;
        }
        Arc::new(Limited {
            inner,
            permits: (limits.max_concurrency > 0).then(|| Semaphore::new(limits.max_concurrency)),
            up: limits.upload_bps.map(Bandwidth::new),
            down: limits.download_bps.map(Bandwidth::new),
        })
    }

    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.permits {
            Some(s) => Some(s.acquire().await.expect("semaphore never closed")),
            None => None,
        }
    }
}

#[async_trait]
impl Target for Limited {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn location(&self) -> &str {
        self.inner.location()
    }
    async fn put_new(&self, object: &str, data: Bytes) -> Result<PutOutcome> {
        let _p = self.permit().await;
        if let Some(b) = &self.up {
            b.take(data.len()).await;
        }
        self.inner.put_new(object, data).await
    }
    async fn overwrite(&self, object: &str, data: Bytes) -> Result<()> {
        let _p = self.permit().await;
        if let Some(b) = &self.up {
            b.take(data.len()).await;
        }
        self.inner.overwrite(object, data).await
    }
    async fn get(&self, object: &str) -> Result<Bytes> {
        let _p = self.permit().await;
        let data = self.inner.get(object).await?;
        if let Some(b) = &self.down {
            b.take(data.len()).await;
        }
        Ok(data)
    }
    async fn get_range(&self, object: &str, range: Range<u64>) -> Result<Bytes> {
        let _p = self.permit().await;
        let data = self.inner.get_range(object, range).await?;
        if let Some(b) = &self.down {
            b.take(data.len()).await;
        }
        Ok(data)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let _p = self.permit().await;
        self.inner.list(prefix).await
    }
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectMeta>> {
        let _p = self.permit().await;
        self.inner.list_after(prefix, start_after, limit).await
    }
    async fn delete(&self, object: &str) -> Result<()> {
        let _p = self.permit().await;
        self.inner.delete(object).await
    }
    async fn purge(&self, object: &str) -> Result<super::Purge> {
        let _p = self.permit().await;
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
    async fn upload_bandwidth_is_enforced() {
        let t = Limited::wrap(
            Arc::new(StoreTarget::memory("m")),
            Limits {
                max_concurrency: 2,
                upload_bps: Some(100_000),
                download_bps: None,
            },
        );
        let start = Instant::now();
        // 1 s of burst, then 150 kB more at 100 kB/s: at least ~1.5 s.
        for i in 0..5 {
            t.put_new(&format!("o{i}"), Bytes::from(vec![0u8; 50_000]))
                .await
                .unwrap();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(t.list("").await.unwrap().len(), 5);
    }

    #[tokio::test]
    async fn download_bandwidth_is_enforced() {
        let inner: TargetRef = Arc::new(StoreTarget::memory("m"));
        for i in 0..5 {
            inner
                .put_new(&format!("o{i}"), Bytes::from(vec![7u8; 50_000]))
                .await
                .unwrap();
        }
        let t = Limited::wrap(
            inner,
            Limits {
                max_concurrency: 0,
                upload_bps: None,
                download_bps: Some(100_000),
            },
        );
        let start = Instant::now();
        // 1 s of burst, then 150 kB more at 100 kB/s: at least ~1.5 s,
        // whether whole objects or ranges are read.
        let mut got = 0;
        for i in 0..3 {
            got += t.get(&format!("o{i}")).await.unwrap().len();
        }
        for i in 3..5 {
            got += t
                .get_range(&format!("o{i}"), 0..50_000)
                .await
                .unwrap()
                .len();
        }
        assert_eq!(got, 250_000);
        assert!(
            start.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            start.elapsed()
        );
    }
}
