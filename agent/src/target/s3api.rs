//! The S3 calls `object_store` has no API for, over `aws-sdk-s3`: bucket
//! versioning and Object Lock configuration, per-object retention (write
//! with a retain-until date, read it, extend it), and listing and deleting
//! object versions. Used only by [`super::store::StoreTarget`] on S3 targets.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::{ByteStream, DateTime as AwsDateTime};
use aws_sdk_s3::types::{
    BucketVersioningStatus, ChecksumAlgorithm, ObjectLockLegalHoldStatus, ObjectLockMode,
    ObjectLockRetention, ObjectLockRetentionMode,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::LockMode;

/// One stored version (or delete marker) of a key.
#[derive(Debug, Clone)]
pub struct Version {
    pub key: String,
    pub version_id: String,
    pub delete_marker: bool,
}

/// A failed S3 call: its error code (`AccessDenied`, `PreconditionFailed`,
/// `NoSuchKey`, ...) when the server sent one, and a message for humans.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ApiError {
    fn from_sdk<E, R>(e: aws_sdk_s3::error::SdkError<E, R>) -> ApiError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + HttpStatus,
    {
        let status = e.raw_response().map(|r| r.status_code());
        let code = e.code().map(str::to_string);
        let message = match (&code, e.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            _ => format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)),
        };
        ApiError {
            code,
            status,
            message,
        }
    }

    /// The server refused because a lock (retention or legal hold) protects the version.
    pub fn is_denied(&self) -> bool {
        self.code.as_deref() == Some("AccessDenied") || self.status == Some(403)
    }

    pub fn is_precondition(&self) -> bool {
        self.code.as_deref() == Some("PreconditionFailed") || self.status == Some(412)
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("NoSuchKey" | "NotFound" | "NoSuchVersion")
        ) || self.status == Some(404)
    }

    /// No retention / lock configuration exists for the object or bucket.
    pub fn is_no_configuration(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some(
                "NoSuchObjectLockConfiguration"
                    | "ObjectLockConfigurationNotFoundError"
                    | "InvalidRequest"
            )
        )
    }
}

/// Status code of a raw response (lets `from_sdk` stay generic).
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

fn to_aws(t: DateTime<Utc>) -> AwsDateTime {
    AwsDateTime::from_secs(t.timestamp())
}

fn from_aws(t: &AwsDateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn mode(m: LockMode) -> ObjectLockMode {
    match m {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

fn retention_mode(m: LockMode) -> ObjectLockRetentionMode {
    match m {
        LockMode::Governance => ObjectLockRetentionMode::Governance,
        LockMode::Compliance => ObjectLockRetentionMode::Compliance,
    }
}

/// An S3 client bound to one bucket.
#[derive(Debug, Clone)]
pub struct S3Api {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// Connection settings, already resolved.
pub struct Connect<'a> {
    pub bucket: &'a str,
    pub endpoint: Option<&'a str>,
    pub region: &'a str,
    pub path_style: bool,
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

/// Credentials from `object_store`'s provider chain (web identity, ECS and
/// EKS container credentials, instance metadata), so the aws-sdk client signs
/// with exactly what the object_store client of the same target uses.
#[derive(Debug)]
struct StoreCredentials(object_store::aws::AwsCredentialProvider);

impl aws_credential_types::provider::ProvideCredentials for StoreCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let c = self.0.get_credential().await.map_err(|e| {
                aws_credential_types::provider::error::CredentialsError::provider_error(e)
            })?;
            Ok(aws_credential_types::Credentials::new(
                &c.key_id,
                &c.secret_key,
                c.token.clone(),
                None,
                "object_store",
            ))
        })
    }
}

impl S3Api {
    /// A client with the default time limit per request attempt.
    pub fn new(c: Connect<'_>) -> S3Api {
        Self::with_request_timeout(c, super::store::DEFAULT_REQUEST_TIMEOUT)
    }

    /// A client whose request attempts time out after `request_timeout`.
    pub fn with_request_timeout(c: Connect<'_>, request_timeout: std::time::Duration) -> S3Api {
        let creds = aws_credential_types::Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            c.session_token.map(str::to_string),
            None,
            "custos-config",
        );
        Self::build(
            &c,
            aws_credential_types::provider::SharedCredentialsProvider::new(creds),
            request_timeout,
        )
    }

    /// A client whose credentials come from an `object_store` provider (no
    /// static keys: `c`'s key fields are ignored).
    pub fn with_store_credentials(
        c: Connect<'_>,
        provider: object_store::aws::AwsCredentialProvider,
        request_timeout: std::time::Duration,
    ) -> S3Api {
        Self::build(
            &c,
            aws_credential_types::provider::SharedCredentialsProvider::new(StoreCredentials(
                provider,
            )),
            request_timeout,
        )
    }

    fn build(
        c: &Connect<'_>,
        creds: aws_credential_types::provider::SharedCredentialsProvider,
        request_timeout: std::time::Duration,
    ) -> S3Api {
        use aws_smithy_http_client::tls;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(c.region.to_string()))
            .credentials_provider(creds)
            .http_client(http)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .operation_attempt_timeout(request_timeout)
                    .build(),
            )
            // Set explicitly (the SDK's default depends on the behavior
            // version): transient errors, timeouts and 5xx are retried with
            // jittered exponential backoff, as object_store does for the rest.
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(5)
                    .with_initial_backoff(std::time::Duration::from_millis(100))
                    .with_max_backoff(std::time::Duration::from_secs(10)),
            )
            .force_path_style(c.path_style);
        if let Some(ep) = c.endpoint {
            b = b.endpoint_url(ep);
        }
        S3Api {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: c.bucket.to_string(),
        }
    }

    /// The underlying client (tests and admin tooling).
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Is versioning enabled (or suspended: old versions may still exist)?
    /// `None` when the bucket never had versioning.
    pub async fn versioning(&self) -> ApiResult<Option<BucketVersioningStatus>> {
        let r = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(ApiError::from_sdk)?;
        Ok(r.status().cloned())
    }

    /// Does the bucket have Object Lock enabled?
    pub async fn object_lock_enabled(&self) -> ApiResult<bool> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(r) => Ok(r
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled")),
            Err(e) => {
                let e = ApiError::from_sdk(e);
                if e.is_no_configuration() || e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Write `key`: create-only (`If-None-Match: *`; false when it exists)
    /// or a new version (a repair), with an Object Lock retain-until when
    /// `lock` is given.
    ///
    /// The body travels with a CRC32C checksum (`x-amz-checksum-crc32c`)
    /// that the server checks, and its SigV4 payload hash is left out
    /// (`UNSIGNED-PAYLOAD`): hashing 16 MiB packs with SHA-256 cost ~5 % of
    /// a backup's CPU, and not every server checks that hash (SeaweedFS
    /// does not; it does check the CRC32C). Over HTTPS TLS protects the body
    /// as well. Packs are sealed, so a changed body never passes a read.
    pub async fn put(
        &self,
        key: &str,
        data: Bytes,
        create_only: bool,
        lock: Option<(LockMode, DateTime<Utc>)>,
    ) -> ApiResult<bool> {
        let r = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_if_none_match(create_only.then(|| "*".to_string()))
            .set_object_lock_mode(lock.map(|(m, _)| mode(m)))
            .set_object_lock_retain_until_date(lock.map(|(_, until)| to_aws(until)))
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .body(ByteStream::from(data))
            .customize()
            .disable_payload_signing()
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = ApiError::from_sdk(e);
                if create_only && e.is_precondition() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Every version and delete marker of keys starting with `prefix`.
    pub async fn list_versions(&self, prefix: &str) -> ApiResult<Vec<Version>> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut vid_marker: Option<String> = None;
        loop {
            let r = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(vid_marker.clone())
                .send()
                .await
                .map_err(ApiError::from_sdk)?;
            for v in r.versions() {
                if let (Some(k), Some(id)) = (v.key(), v.version_id()) {
                    out.push(Version {
                        key: k.to_string(),
                        version_id: id.to_string(),
                        delete_marker: false,
                    });
                }
            }
            for m in r.delete_markers() {
                if let (Some(k), Some(id)) = (m.key(), m.version_id()) {
                    out.push(Version {
                        key: k.to_string(),
                        version_id: id.to_string(),
                        delete_marker: true,
                    });
                }
            }
            if r.is_truncated() != Some(true) {
                break;
            }
            key_marker = r.next_key_marker().map(str::to_string);
            vid_marker = r.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Delete one version (or delete marker) for good; missing is success.
    pub async fn delete_version(&self, key: &str, version_id: &str) -> ApiResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .version_id(version_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = ApiError::from_sdk(e);
                if e.is_not_found() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Plain delete (on a versioned bucket: adds a delete marker).
    pub async fn delete(&self, key: &str) -> ApiResult<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(ApiError::from_sdk)
    }

    /// Retain-until of a version (the current one when `version_id` is None),
    /// or of its legal hold (reported as "until further notice": `DateTime::MAX_UTC`).
    /// None when nothing protects it.
    pub async fn protected_until(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> ApiResult<Option<DateTime<Utc>>> {
        let r = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(ApiError::from_sdk)?;
        if r.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On) {
            return Ok(Some(DateTime::<Utc>::MAX_UTC));
        }
        Ok(r.object_lock_retain_until_date().and_then(from_aws))
    }

    /// Set a version's retention (the current version when `version_id` is None).
    pub async fn put_retention(
        &self,
        key: &str,
        version_id: Option<&str>,
        lock: LockMode,
        until: DateTime<Utc>,
    ) -> ApiResult<()> {
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .retention(
                ObjectLockRetention::builder()
                    .mode(retention_mode(lock))
                    .retain_until_date(to_aws(until))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(ApiError::from_sdk)
    }
}
