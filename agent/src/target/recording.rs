//! [`Recording`] (tests only): a pass-through target that records every
//! read and listing, so a test can assert how many requests an operation
//! made and of what kind.

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
}

impl Recording {
    pub fn new(inner: TargetRef) -> Recording {
        Recording {
            inner,
            calls: Mutex::default(),
        }
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
        self.record("get_range_stream", object, 0);
        self.inner.get_range_stream(object, range).await
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
