//! [`Recording`] (tests only): a pass-through target that records every
//! read and listing, so a test can assert how many requests an operation
//! made and of what kind; it can also cut streamed reads short and refuse
//! overwrites.

use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ByteStream, ObjectMeta, PutOutcome, Target, TargetRef};
use crate::error::Result;

/// One recorded call: the operation, the object or prefix, and for
/// listings how many objects they returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: &'static str,
    pub object: String,
    pub listed: usize,
}

/// Wraps a target and records its reads and listings.
#[derive(Debug)]
pub struct Recording {
    inner: TargetRef,
    calls: Mutex<Vec<Call>>,
    /// Streamed reads fail after this many bytes (a transfer broken midway).
    cut_streams_after: Mutex<Option<usize>>,
    /// Overwrites fail (a store refusing to replace an object).
    refuse_overwrites: std::sync::atomic::AtomicBool,
}

impl Recording {
    pub fn new(inner: TargetRef) -> Recording {
        Recording {
            inner,
            calls: Mutex::default(),
            cut_streams_after: Mutex::default(),
            refuse_overwrites: Default::default(),
        }
    }

    /// From now on, fail every overwrite (false: pass them on).
    pub fn refuse_overwrites(&self, refuse: bool) {
        (self.refuse_overwrites).store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on, end every streamed read with an error once `n` bytes
    /// have been passed on (None: pass streams whole).
    pub fn cut_streams_after(&self, n: Option<usize>) {
        *self.cut_streams_after.lock().expect("cut lock") = n;
    }

    /// The calls recorded since the last `take`, oldest first.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().expect("calls lock"))
    }

    fn record(&self, op: &'static str, object: &str, listed: usize) {
        self.calls.lock().expect("calls lock").push(Call {
            op,
            object: object.to_string(),
            listed,
        });
    }
}

#[async_trait]
impl Target for Recording {
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
        if self
            .refuse_overwrites
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(crate::Error::Failed(format!(
                "{object}: overwrite refused by the test"
            )));
        }
        self.inner.overwrite(object, data).await
    }
    async fn get(&self, object: &str) -> Result<Bytes> {
        self.record("get", object, 0);
        self.inner.get(object).await
    }
    async fn get_range(&self, object: &str, range: Range<u64>) -> Result<Bytes> {
        self.record("get_range", object, 0);
        self.inner.get_range(object, range).await
    }
    async fn get_range_stream(&self, object: &str, range: Range<u64>) -> Result<ByteStream> {
        use futures::StreamExt;
        self.record("get_range_stream", object, 0);
        let stream = self.inner.get_range_stream(object, range).await?;
        let Some(limit) = *self.cut_streams_after.lock().expect("cut lock") else {
            return Ok(stream);
        };
        // Pass on `limit` bytes, then fail.
        let cut = stream
            .scan(limit, |left, chunk| {
                let out = match chunk {
                    Ok(_) if *left == 0 => {
                        Some(Err(crate::Error::Failed("stream cut by the test".into())))
                    }
                    Ok(c) if c.len() > *left => {
                        let part = c.slice(..*left);
                        *left = 0;
                        Some(Ok(part))
                    }
                    Ok(c) => {
                        *left -= c.len();
                        Some(Ok(c))
                    }
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(out)
            })
            .chain(futures::stream::once(async {
                Err(crate::Error::Failed("stream cut by the test".into()))
            }));
        Ok(Box::pin(cut))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let v = self.inner.list(prefix).await?;
        self.record("list", prefix, v.len());
        Ok(v)
    }
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectMeta>> {
        let v = self.inner.list_after(prefix, start_after, limit).await?;
        self.record("list_after", prefix, v.len());
        Ok(v)
    }
    async fn delete(&self, object: &str) -> Result<()> {
        self.inner.delete(object).await
    }
}
