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

use super::localfile::{self, Publish};
use super::s3api::{Connect, S3Api};
use super::{
    lockable, whole_range, ByteStream, Immutability, ObjectLock, ObjectMeta, Purge, PutOutcome,
    Target,
};
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
    /// Object Lock for every repository object written (`object_lock` of the target).
    pub object_lock: Option<ObjectLock>,
    /// Time limit of one HTTP request attempt (a timed-out attempt is retried);
    /// default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Option<Duration>,
}

/// Default time limit of one S3 request attempt: generous, so a 16 MiB pack
/// on a slow link is not cut off, yet a hung connection does not stall a run.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("object_lock", &self.object_lock)
            .field("request_timeout", &self.request_timeout)
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
    /// S3 only: the calls object_store cannot make (versions, Object Lock).
    s3: Option<S3Ext>,
}

/// What an S3 target needs beyond object_store.
#[derive(Debug)]
struct S3Ext {
    /// The bucket (named in permission errors).
    bucket_name: String,
    /// The aws-sdk client: static credentials, or object_store's credential chain.
    api: Option<S3Api>,
    lock: Option<ObjectLock>,
    /// Bucket facts, asked once per process: (versioning ever enabled, Object Lock enabled).
    bucket: tokio::sync::OnceCell<(Option<String>, bool)>,
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
            s3: None,
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
            s3: None,
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
        let timeout = o.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&region)
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
                    .with_timeout(timeout)
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
        let mut api = None;
        if let (Some(k), Some(s)) = (key, secret) {
            let token = o.session_token.clone().or_else(|| env("AWS_SESSION_TOKEN"));
            api = Some(S3Api::with_request_timeout(
                Connect {
                    bucket,
                    endpoint: endpoint.as_deref(),
                    region: &region,
                    path_style: o.path_style.unwrap_or(endpoint.is_some()),
                    access_key_id: &k,
                    secret_access_key: &s,
                    session_token: token.as_deref(),
                },
                timeout,
            ));
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = token {
                b = b.with_token(t);
            }
        } else {
            // No static keys: object_store's credential chain (web identity
            // from the environment, ECS/EKS container credentials, instance
            // metadata); the container variables are passed on explicitly.
            for var in [
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "AWS_METADATA_ENDPOINT",
            ] {
                if let (Some(v), Ok(key)) = (
                    env(var),
                    var.to_ascii_lowercase()
                        .parse::<object_store::aws::AmazonS3ConfigKey>(),
                ) {
                    b = b.with_config(key, v);
                }
            }
        }
        let store = b
            .build()
            .map_err(|e| Error::Config(format!("target {name} ({url}): {e}")))?;
        if api.is_none() {
            // The same credentials for the calls object_store cannot make
            // (versions, Object Lock): without them a versioned bucket would
            // only get delete markers.
            api = Some(S3Api::with_store_credentials(
                Connect {
                    bucket,
                    endpoint: endpoint.as_deref(),
                    region: &region,
                    path_style: o.path_style.unwrap_or(endpoint.is_some()),
                    access_key_id: "",
                    secret_access_key: "",
                    session_token: None,
                },
                store.credentials().clone(),
                timeout,
            ));
        }
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
            s3: Some(S3Ext {
                bucket_name: bucket.to_string(),
                api,
                lock: o.object_lock,
                bucket: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The S3 API client, when this is an S3 target with credentials.
    fn api(&self) -> Option<&S3Api> {
        self.s3.as_ref().and_then(|x| x.api.as_ref())
    }

    /// (versioning status, Object Lock enabled) of the bucket, asked once.
    async fn bucket_facts(&self) -> Result<(Option<String>, bool)> {
        let (Some(x), Some(api)) = (&self.s3, self.api()) else {
            return Ok((None, false));
        };
        x.bucket
            .get_or_try_init(|| async {
                let v = api
                    .versioning()
                    .await
                    .map_err(|e| self.api_err("get versioning of", "", e))?;
                let lock = api
                    .object_lock_enabled()
                    .await
                    .map_err(|e| self.api_err("get object lock configuration of", "", e))?;
                Ok((v.map(|v| v.as_str().to_ascii_lowercase()), lock))
            })
            .await
            .cloned()
    }

    fn api_err(&self, op: &'static str, object: &str, e: super::s3api::ApiError) -> Error {
        let kind = if e.is_not_found() {
            StorageErrorKind::NotFound
        } else {
            StorageErrorKind::Other
        };
        let bucket = self.s3.as_ref().map_or("", |x| x.bucket_name.as_str());
        let refused =
            (e.status.is_some_and(|s| s == 401 || s == 403) || e.is_denied()).then(|| {
                let code = e.code.as_deref().unwrap_or("AccessDenied");
                self.refused(code, e.status.unwrap_or(403), object)
            });
        let (object, detail) = if object.is_empty() {
            (format!("bucket {bucket}"), e.to_string())
        } else if let Some(r) = refused {
            (object.to_string(), r)
        } else {
            let status = e.status.map(|s| format!("HTTP {s}, ")).unwrap_or_default();
            (
                object.to_string(),
                format!("{e} ({status}bucket {bucket}, key {})", self.key(object)),
            )
        };
        Error::Storage {
            target: self.name.clone(),
            op,
            object,
            detail,
            kind,
        }
    }

    /// A refusal by the store (HTTP 401/403), said plainly: the S3 error
    /// code, bucket and key, instead of object_store's request dump.
    fn denied_detail(&self, object: &str, e: &object_store::Error) -> Option<String> {
        let (status, fallback) = match e {
            object_store::Error::PermissionDenied { .. } => (403, "AccessDenied"),
            object_store::Error::Unauthenticated { .. } => (401, "Unauthenticated"),
            _ => return None,
        };
        let text = e.to_string();
        let code = text
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map_or(fallback, |(code, _)| code);
        Some(self.refused(code, status, object))
    }

    /// `CODE (HTTP status) from bucket B, key K: hint` for a refused request.
    fn refused(&self, code: &str, status: u16, object: &str) -> String {
        let hint = if code == "AccessDenied" {
            "the storage identity in use is not allowed to do this"
        } else {
            "check the target's credentials"
        };
        match &self.s3 {
            Some(x) => format!(
                "{code} (HTTP {status}) from bucket {}, key {}: {hint}",
                x.bucket_name,
                self.key(object)
            ),
            None => format!("{code} (HTTP {status}): {hint}"),
        }
    }

    fn key(&self, object: &str) -> String {
        self.path(object).to_string()
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
            StorageErrorKind::Other => self
                .denied_detail(object, &e)
                .unwrap_or_else(|| e.to_string()),
        };
        Error::Storage {
            target: self.name.clone(),
            op,
            object: object.to_string(),
            detail,
            kind,
        }
    }

    /// Write `object` into a local target's directory, durably and
    /// atomically (see [`localfile`]), on the blocking pool: the writes and
    /// fsyncs wait for the disk. `None` for a target that is not local;
    /// otherwise whether the object was created (false: a create-only put
    /// found the name taken).
    async fn write_local(
        &self,
        object: &str,
        data: Bytes,
        publish: Publish,
    ) -> Result<Option<bool>> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        let op = match publish {
            Publish::CreateNew => "put",
            Publish::Replace => "overwrite",
        };
        let Some(path) = localfile::object_path(root, object) else {
            return Err(Error::Storage {
                target: self.name.clone(),
                op,
                object: object.to_string(),
                detail: "not a valid object name for a local directory".into(),
                kind: StorageErrorKind::Other,
            });
        };
        let task =
            tokio::task::spawn_blocking(move || localfile::write(&path, &data, publish, true));
        match task.await {
            Ok(Ok(created)) => Ok(Some(created)),
            Ok(Err(e)) => Err(Error::Storage {
                target: self.name.clone(),
                op,
                object: object.to_string(),
                detail: e.to_string(),
                kind: StorageErrorKind::Other,
            }),
            Err(e) => Err(Error::Failed(format!("writing {object} failed: {e}"))),
        }
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
        if let (Some(lock), Some(api)) = (self.object_lock(), self.api()) {
            if lockable(object) {
                let until = lock.until(chrono::Utc::now());
                return match api
                    .put(&self.key(object), data, true, Some((lock.mode, until)))
                    .await
                {
                    Ok(true) => Ok(PutOutcome::Created),
                    Ok(false) => Ok(PutOutcome::AlreadyExists),
                    Err(e) => Err(self.api_err("put (with object lock)", object, e)),
                };
            }
        }
        if let Some(api) = self.api() {
            // CRC32C-checked body, no SHA-256 payload hash (S3Api::put).
            // The SDK retries a create-only PUT whose connection broke after
            // sending: names are content hashes or random ids, so "already
            // exists" on a retry is success.
            return match api.put(&self.key(object), data, true, None).await {
                Ok(true) => Ok(PutOutcome::Created),
                Ok(false) => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(self.api_err("put", object, e)),
            };
        }
        if let Some(created) = self
            .write_local(object, data.clone(), Publish::CreateNew)
            .await?
        {
            return Ok(match created {
                true => PutOutcome::Created,
                false => PutOutcome::AlreadyExists,
            });
        }
        // Memory (every S3 target has the API client).
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from_bytes(data);
        match self.store.put_opts(&self.path(object), payload, opts).await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.err("put", object, e)),
        }
    }

    async fn overwrite(&self, object: &str, data: Bytes) -> Result<()> {
        // A repaired object on a locked bucket is locked like a new one.
        if let (Some(lock), Some(api)) = (self.object_lock(), self.api()) {
            if lockable(object) {
                let until = lock.until(chrono::Utc::now());
                return api
                    .put(&self.key(object), data, false, Some((lock.mode, until)))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.api_err("overwrite (with object lock)", object, e));
            }
        }
        if let Some(api) = self.api() {
            return (api.put(&self.key(object), data, false, None).await)
                .map(|_| ())
                .map_err(|e| self.api_err("overwrite", object, e));
        }
        if self
            .write_local(object, data.clone(), Publish::Replace)
            .await?
            .is_some()
        {
            return Ok(());
        }
        self.store
            .put(&self.path(object), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| self.err("overwrite", object, e))
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

    async fn get_range_stream(&self, object: &str, range: Range<u64>) -> Result<ByteStream> {
        if self.local_root.is_some() {
            // object_store streams local files in 8 KiB reads, each on the
            // blocking pool: one read of the range is much cheaper.
            return whole_range(self, object, range).await;
        }
        let opts = object_store::GetOptions {
            range: Some(range.into()),
            ..Default::default()
        };
        let r = (self.store.get_opts(&self.path(object), opts).await)
            .map_err(|e| self.err("get range of", object, e))?;
        let (target, object) = (self.name.clone(), object.to_string());
        // Failing mid-body is a transfer error, never "not found".
        Ok(Box::pin(r.into_stream().map_err(move |e| Error::Storage {
            target: target.clone(),
            op: "get range of",
            object: object.clone(),
            detail: e.to_string(),
            kind: StorageErrorKind::Other,
        })))
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

    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectMeta>> {
        use futures::StreamExt as _;
        let p = self.path(prefix.trim_end_matches('/'));
        let stream = self
            .store
            .list_with_offset(Some(&p), &self.path(start_after));
        // Only as many pages as the items taken are requested.
        let items: Vec<object_store::ObjectMeta> = stream
            .take(limit.unwrap_or(usize::MAX))
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

    async fn sweep_staging(
        &self,
        older_than: std::time::Duration,
        dry_run: bool,
    ) -> Result<Vec<ObjectMeta>> {
        let Some(root) = self.local_root.clone() else {
            return Ok(Vec::new());
        };
        let cutoff = std::time::SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(std::time::UNIX_EPOCH);
        let task =
            tokio::task::spawn_blocking(move || localfile::sweep_staging(&root, cutoff, dry_run));
        let found = match task.await {
            Ok(r) => r.map_err(|e| Error::Storage {
                target: self.name.clone(),
                op: "sweep staging files under",
                object: self.location.clone(),
                detail: e.to_string(),
                kind: StorageErrorKind::Other,
            })?,
            Err(e) => return Err(Error::Failed(format!("sweeping staging files failed: {e}"))),
        };
        Ok(found
            .into_iter()
            .map(|f| ObjectMeta {
                name: f.name,
                size: f.size,
                modified: f.modified.into(),
            })
            .collect())
    }

    fn object_lock(&self) -> Option<ObjectLock> {
        self.s3.as_ref().and_then(|x| x.lock)
    }

    async fn purge(&self, object: &str) -> Result<Purge> {
        let (versioning, locks) = self.bucket_facts().await?;
        let Some(api) = self.api().filter(|_| versioning.is_some()) else {
            return self.delete(object).await.map(|()| Purge::Removed);
        };
        let key = self.key(object);
        let versions: Vec<_> = api
            .list_versions(&key)
            .await
            .map_err(|e| self.api_err("list versions of", object, e))?
            .into_iter()
            .filter(|v| v.key == key)
            .collect();
        if locks {
            // Ask first, so a locked object is left whole (not hidden behind a marker).
            let now = chrono::Utc::now();
            let mut until = None;
            for v in versions.iter().filter(|v| !v.delete_marker) {
                match api.protected_until(&key, Some(&v.version_id)).await {
                    Ok(Some(t)) if t > now => until = until.max(Some(t)),
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(self.api_err("get retention of", object, e)),
                }
            }
            if let Some(t) = until {
                return Ok(Purge::Locked(t));
            }
        }
        for v in &versions {
            if let Err(e) = api.delete_version(&key, &v.version_id).await {
                if e.is_denied() {
                    if let Ok(Some(t)) = api.protected_until(&key, Some(&v.version_id)).await {
                        return Ok(Purge::Locked(t));
                    }
                }
                return Err(self.api_err("delete version of", object, e));
            }
        }
        Ok(Purge::Removed)
    }

    async fn locked_until(&self, object: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let Some(api) = self.api() else {
            return Ok(None);
        };
        match api.protected_until(&self.key(object), None).await {
            Ok(t) => Ok(t),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.api_err("get retention of", object, e)),
        }
    }

    async fn extend_lock(&self, object: &str, until: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let (Some(lock), Some(api)) = (self.object_lock(), self.api()) else {
            return Err(Error::Invalid(format!(
                "target {}: no object_lock configured",
                self.name
            )));
        };
        let key = self.key(object);
        let current = api
            .protected_until(&key, None)
            .await
            .map_err(|e| self.api_err("get retention of", object, e))?;
        if current.is_some_and(|c| c >= until) {
            return Ok(());
        }
        api.put_retention(&key, None, lock.mode, until)
            .await
            .map_err(|e| self.api_err("extend retention of", object, e))
    }

    async fn check_immutability(&self) -> Result<Immutability> {
        let mut out = Immutability {
            target: self.name.clone(),
            object_lock_mode: self.object_lock().map(|l| l.mode),
            object_lock_period_secs: self.object_lock().map(|l| l.period.as_secs()),
            ..Default::default()
        };
        let Some(api) = self.api() else {
            out.detail = if self.s3.is_some() {
                "no static S3 credentials: versioning and Object Lock cannot be checked".into()
            } else {
                "not an S3 target: nothing stops deletion".into()
            };
            return Ok(out);
        };
        let (versioning, locks) = self.bucket_facts().await?;
        out.versioning = Some(versioning.clone().unwrap_or_else(|| "off".into()));
        out.bucket_object_lock = locks;
        let Some(lock) = self.object_lock() else {
            out.detail = "no object_lock configured for this target: objects are written \
                          without retention"
                .into();
            return Ok(out);
        };
        // The canary: a real object locked like repository data (but only for
        // a minute), then an attempt to delete exactly that version.
        let name = format!("probes/lock-canary-{}", crate::id::Id(rand::random()));
        let key = self.key(&name);
        let until = chrono::Utc::now() + chrono::Duration::seconds(60);
        if let Err(e) = api
            .put(
                &key,
                Bytes::from_static(b"custos lock canary"),
                true,
                Some((lock.mode, until)),
            )
            .await
        {
            out.detail = format!(
                "writing a locked canary failed ({e}): the bucket does not accept Object Lock"
            );
            return Ok(out);
        }
        let versions = api
            .list_versions(&key)
            .await
            .map_err(|e| self.api_err("list versions of", &name, e))?;
        let Some(v) = versions.iter().find(|v| v.key == key && !v.delete_marker) else {
            out.detail = "the locked canary has no version id: the bucket is not versioned".into();
            let _ = api.delete(&key).await;
            return Ok(out);
        };
        let retained = api
            .protected_until(&key, Some(&v.version_id))
            .await
            .ok()
            .flatten();
        match api.delete_version(&key, &v.version_id).await {
            Ok(()) => {
                out.detail = format!(
                    "deleting the locked canary version succeeded (retain-until reported: {}): \
                     the bucket does NOT enforce Object Lock",
                    retained.map_or("none".to_string(), |t| t.to_rfc3339())
                );
            }
            Err(e) if e.is_denied() => {
                out.immutable = true;
                out.detail = format!(
                    "a {} canary locked until {} could not be deleted ({e})",
                    match lock.mode {
                        super::LockMode::Governance => "governance",
                        super::LockMode::Compliance => "compliance",
                    },
                    until.to_rfc3339()
                );
                // Hide it; its version expires in a minute (removed by a later check).
                let _ = api.delete(&key).await;
            }
            Err(e) => {
                out.detail = format!("deleting the canary version failed unexpectedly: {e}");
            }
        }
        // Sweep canaries of earlier checks whose lock has run out.
        if let Ok(old) = api.list_versions(&self.key("probes/lock-canary-")).await {
            for o in old.iter().filter(|o| o.key != key) {
                let _ = api.delete_version(&o.key, &o.version_id).await;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name from a hostile listing (what `sync` copies) cannot place a
    /// file outside a local target's directory; a normal one lands in it.
    #[tokio::test]
    async fn a_local_target_refuses_names_that_leave_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let t = StoreTarget::local("l", &dir.path().join("repo"), true).unwrap();
        for name in ["data/../../escaped", "../escaped", "data/ab/x#1"] {
            let e = t.put_new(name, Bytes::from_static(b"x")).await.unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(name) && msg.contains("target l"), "{msg}");
            assert!(t.overwrite(name, Bytes::from_static(b"x")).await.is_err());
        }
        assert!(!dir.path().join("escaped").exists());
        let out = t
            .put_new("data/ab/abcd", Bytes::from_static(b"ok"))
            .await
            .unwrap();
        assert!(matches!(out, PutOutcome::Created));
        assert_eq!(
            std::fs::read(dir.path().join("repo/data/ab/abcd")).unwrap(),
            b"ok"
        );
    }

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
