//! [`Target`] over `object_store`: local directory, S3-compatible bucket, memory.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::{ObjectMeta, PutOutcome, Target};
use crate::error::{Error, Result, StorageErrorKind};

/// S3 connection settings (secrets already resolved by the caller).
#[derive(Clone, Default)]
pub struct S3Options {
    /// Endpoint URL (`http://127.0.0.1:8333`); `AWS_ENDPOINT_URL` when unset.
    pub endpoint: Option<String>,
    /// Region; `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default true with a custom endpoint.
    pub path_style: Option<bool>,
    /// Access key id; `AWS_ACCESS_KEY_ID` when unset.
    pub access_key_id: Option<String>,
    /// Secret access key; `AWS_SECRET_ACCESS_KEY` when unset.
    pub secret_access_key: Option<String>,
    /// Session token; `AWS_SESSION_TOKEN` when unset.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// Where a target URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket and key prefix.
    S3 { bucket: String, prefix: String },
    /// A process-local in-memory store (tests).
    Memory,
}

impl TargetUrl {
    /// Parse `/path`, `file:///path`, `s3://bucket/prefix` or `memory:`.
    pub fn parse(url: &str) -> Result<TargetUrl> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Config(format!("target url {url}: no bucket name")));
            }
            return Ok(TargetUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if url == "memory:" || url.starts_with("memory://") {
            return Ok(TargetUrl::Memory);
        }
        if let Some(p) = url.strip_prefix("file://") {
            return Ok(TargetUrl::Local(PathBuf::from(p)));
        }
        if url.contains("://") {
            return Err(Error::Config(format!(
                "target url {url}: unsupported scheme (use a path, file://, s3:// or memory:)"
            )));
        }
        if url.is_empty() {
            return Err(Error::Config("target url is empty".into()));
        }
        Ok(TargetUrl::Local(PathBuf::from(url)))
    }
}

/// A target backed by an `object_store` implementation.
#[derive(Debug)]
pub struct StoreTarget {
    name: String,
    location: String,
    store: Arc<dyn ObjectStore>,
    prefix: Option<StorePath>,
    /// Root directory for local targets: written objects are fsynced there.
    local_root: Option<PathBuf>,
}

impl StoreTarget {
    /// Open (or with `create`, create the directory of) a target.
    pub fn open(name: &str, url: &str, s3: &S3Options, create: bool) -> Result<StoreTarget> {
        match TargetUrl::parse(url)? {
            TargetUrl::Local(path) => Self::local(name, &path, create),
            TargetUrl::S3 { bucket, prefix } => Self::s3(name, url, &bucket, &prefix, s3),
            TargetUrl::Memory => Ok(Self::memory(name)),
        }
    }

    /// A fresh in-memory target.
    pub fn memory(name: &str) -> StoreTarget {
        StoreTarget {
            name: name.to_string(),
            location: "memory:".into(),
            store: Arc::new(InMemory::new()),
            prefix: None,
            local_root: None,
        }
    }

    fn local(name: &str, path: &Path, create: bool) -> Result<StoreTarget> {
        if create {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        } else if !path.is_dir() {
            return Err(Error::RepoNotFound {
                location: path.display().to_string(),
                detail: "directory does not exist".into(),
            });
        }
        let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
        let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| {
            Error::Config(format!("target {name}: local path {}: {e}", path.display()))
        })?;
        Ok(StoreTarget {
            name: name.to_string(),
            location: root.display().to_string(),
            store: Arc::new(store),
            prefix: None,
            local_root: Some(root),
        })
    }

    fn s3(name: &str, url: &str, bucket: &str, prefix: &str, o: &S3Options) -> Result<StoreTarget> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = o.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL"));
        let region = o
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                // ~6 s of backoff in all: enough for a restarting server or a
                // 503 burst, short enough that a dead target is reported as
                // lagging quickly instead of stalling every other target.
                max_retries: 6,
                retry_timeout: Duration::from_secs(120),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(300))
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_allow_http(
                        endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            );
        if let Some(ep) = &endpoint {
            b = b
                .with_endpoint(ep)
                .with_virtual_hosted_style_request(!o.path_style.unwrap_or(true));
        } else if let Some(ps) = o.path_style {
            b = b.with_virtual_hosted_style_request(!ps);
        }
        let key = o.access_key_id.clone().or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = o
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        if let (Some(k), Some(s)) = (key, secret) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = o.session_token.clone().or_else(|| env("AWS_SESSION_TOKEN")) {
                b = b.with_token(t);
            }
        }
        let store = b
            .build()
            .map_err(|e| Error::Config(format!("target {name} ({url}): {e}")))?;
        let location = match &endpoint {
            Some(ep) => format!("{url} at {ep}"),
            None => url.to_string(),
        };
        Ok(StoreTarget {
            name: name.to_string(),
            location,
            store: Arc::new(store),
            prefix: (!prefix.is_empty()).then(|| StorePath::from(prefix)),
            local_root: None,
        })
    }

    fn path(&self, object: &str) -> StorePath {
        match &self.prefix {
            Some(p) => StorePath::from(format!("{p}/{object}")),
            None => StorePath::from(object),
        }
    }

    fn strip<'a>(&self, full: &'a str) -> &'a str {
        match &self.prefix {
            Some(p) => full
                .strip_prefix(p.as_ref())
                .map(|s| s.trim_start_matches('/'))
                .unwrap_or(full),
            None => full,
        }
    }

    fn err(&self, op: &'static str, object: &str, e: object_store::Error) -> Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => StorageErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StorageErrorKind::AlreadyExists,
            _ => StorageErrorKind::Other,
        };
        let detail = match kind {
            StorageErrorKind::NotFound => "not found".to_string(),
            StorageErrorKind::AlreadyExists => "already exists".to_string(),
            StorageErrorKind::Other => e.to_string(),
        };
        Error::Storage {
            target: self.name.clone(),
            op,
            object: object.to_string(),
            detail,
            kind,
        }
    }

    /// Make a freshly written local object durable (file and directory entry).
    fn sync_local(&self, object: &str) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let path = root.join(object);
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Target for StoreTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn put_new(&self, object: &str, data: Bytes) -> Result<PutOutcome> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(object), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => {
                self.sync_local(object)?;
                Ok(PutOutcome::Created)
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.err("put", object, e)),
        }
    }

    async fn overwrite(&self, object: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.path(object), PutPayload::from_bytes(data))
            .await
            .map_err(|e| self.err("overwrite", object, e))?;
        self.sync_local(object)
    }

    async fn get(&self, object: &str) -> Result<Bytes> {
        let r = self
            .store
            .get(&self.path(object))
            .await
            .map_err(|e| self.err("get", object, e))?;
        r.bytes().await.map_err(|e| self.err("get", object, e))
    }

    async fn get_range(&self, object: &str, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(object), range)
            .await
            .map_err(|e| self.err("get range of", object, e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let p = self.path(prefix.trim_end_matches('/'));
        let items: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| self.err("list", prefix, e))?;
        Ok(items
            .into_iter()
            .map(|m| ObjectMeta {
                name: self.strip(m.location.as_ref()).to_string(),
                size: m.size,
                modified: m.last_modified,
            })
            .collect())
    }

    async fn delete(&self, object: &str) -> Result<()> {
        match self.store.delete(&self.path(object)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", object, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing_names_the_bad_url() {
        assert_eq!(
            TargetUrl::parse("s3://b/p/q/").unwrap(),
            TargetUrl::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            TargetUrl::parse("file:///x").unwrap(),
            TargetUrl::Local("/x".into())
        );
        assert_eq!(
            TargetUrl::parse("rel/dir").unwrap(),
            TargetUrl::Local("rel/dir".into())
        );
        let e = TargetUrl::parse("ftp://h/x").unwrap_err().to_string();
        assert!(e.contains("ftp://h/x"), "{e}");
        assert!(TargetUrl::parse("s3:///x").is_err());
    }
}
