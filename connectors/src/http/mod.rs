//! The shared HTTP layer of the API connectors (Slack, Zendesk …).
//!
//! One [`HttpClient`] per connector instance wraps a `reqwest` client
//! (rustls, the system's root certificates) with:
//!
//! - **retries** ([`retry`]): exponential backoff with jitter on 408, 429,
//!   5xx, timeouts and connection errors, up to `max_attempts`; a server's
//!   `Retry-After` (seconds or HTTP-date), `X-RateLimit-Reset` /
//!   `x-rate-limit-reset` (epoch seconds) or JSON `retry_after_ms` (Matrix)
//!   is waited instead of the backoff; a wait longer than `max_wait_secs`
//!   fails at once;
//! - a **token bucket** ([`ratelimit`]) per client: `requests_per_second`,
//!   `burst`;
//! - **authentication** ([`auth`]): bearer, basic, OAuth2 client-credentials
//!   or refresh-token grant with a refresh on 401 (once per token);
//!   credentials are only sent to the base URL's host (and hosts the
//!   connector adds, like `files.slack.com`);
//! - **pagination** ([`paginate`]): cursor field, `Link: rel="next"`,
//!   offset/limit and next-URL styles;
//! - **logging**: one `tracing` event per attempt with `source`, `method`,
//!   `path` (never the query string: tokens travel there), `status`,
//!   `attempt`, `elapsed_ms`;
//! - **errors** ([`HttpError`]) that name the endpoint as `METHOD /path`
//!   and the status, never secrets; [`HttpError::into_connector`] maps them
//!   onto [`ConnectorError`]: 401/403 (after a refresh failed) → `Auth`,
//!   unparseable JSON → `Malformed` naming the endpoint and the JSON path,
//!   everything else → `Unavailable`.
//!
//! API-level verdicts on HTTP 200 answers (Slack's `{"ok":false,
//! "error":"ratelimited"}`) plug in as a [`Check`] on the request.

pub mod auth;
pub mod paginate;
pub mod ratelimit;
pub mod retry;

#[cfg(test)]
pub(crate) mod prism;

#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::io::{Seek as _, Write as _};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, USER_AGENT};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use auth::{token_or_oauth2, Auth, OAuth2, OAuth2Config, Secret};
pub use paginate::{PageStyle, Pager};
pub use ratelimit::TokenBucket;
pub use retry::RetryPolicy;

use crate::ConnectorError;

/// The `[source.http]` table of every HTTP connector: rate limit, retries,
/// timeouts. Every key is optional; the connector picks defaults that fit
/// its API's published limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Average requests per second this source may send (token bucket).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// Requests that may go out at once before the rate applies; default 5.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Attempts per request, the first included; default 5.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// First backoff step in milliseconds (doubles per retry, with jitter);
    /// default 500.
    #[serde(default)]
    pub backoff_base_ms: Option<u64>,
    /// Longest wait in seconds a server may ask for (`Retry-After` …) before
    /// the request fails instead; default 300.
    #[serde(default)]
    pub max_wait_secs: Option<u64>,
    /// Seconds one request (connect + answer) may take; default 60.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

// `requests_per_second` is validated finite and positive.
impl Eq for HttpOptions {}

impl HttpOptions {
    /// Check the values (positive rate, at least one attempt).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = self.requests_per_second {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("http.requests_per_second must be > 0 (got {r})"));
            }
        }
        if self.max_attempts == Some(0) {
            return Err("http.max_attempts must be at least 1".into());
        }
        if self.timeout_secs == Some(0) {
            return Err("http.timeout_secs must be at least 1".into());
        }
        Ok(())
    }

    fn policy(&self) -> RetryPolicy {
        let d = RetryPolicy::default();
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(d.max_attempts).max(1),
            base: self
                .backoff_base_ms
                .map(Duration::from_millis)
                .unwrap_or(d.base),
            max_backoff: d.max_backoff,
            max_wait: self
                .max_wait_secs
                .map(Duration::from_secs)
                .unwrap_or(d.max_wait),
        }
    }
}

/// An HTTP-layer failure. Messages name the endpoint (`GET /api/x`), never a
/// query string, header value or token.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Credentials refused (401/403 after any refresh, OAuth2 refresh
    /// refused, API-level `invalid_auth`) or unreadable.
    #[error("{endpoint}: authentication failed: {detail}")]
    Auth {
        /// `METHOD /path`.
        endpoint: String,
        /// What was refused.
        detail: String,
    },
    /// A final non-success status (after retries for retryable ones).
    #[error("{endpoint}: HTTP {status}{detail}")]
    Status {
        /// `METHOD /path`.
        endpoint: String,
        /// The status code.
        status: u16,
        /// `: <API error code>` and the attempt count, when known.
        detail: String,
    },
    /// Connection, timeout or body errors (after retries), and API-level
    /// failures on a 2xx answer.
    #[error("{endpoint}: {detail}")]
    Transport {
        /// `METHOD /path`.
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// The answer is not the JSON expected.
    #[error("{endpoint}: malformed answer at {path}: {detail}")]
    Malformed {
        /// `METHOD /path`.
        endpoint: String,
        /// JSON path of the problem (`$.messages[3].ts`).
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Bad configuration (base URL, token file).
    #[error("{detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
}

impl HttpError {
    /// The final HTTP status, when the error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The connector error for source `source_name`.
    pub fn into_connector(self, source_name: &str) -> ConnectorError {
        let source_name = source_name.to_string();
        match self {
            HttpError::Auth { .. } => ConnectorError::Auth {
                source_name,
                detail: self.to_string(),
            },
            HttpError::Malformed {
                endpoint,
                path,
                detail,
            } => ConnectorError::Malformed {
                source_name,
                what: endpoint,
                detail: format!("at {path}: {detail}"),
            },
            HttpError::Config { detail } => ConnectorError::Malformed {
                source_name,
                what: "configuration".into(),
                detail,
            },
            other => ConnectorError::Unavailable {
                source_name,
                detail: other.to_string(),
            },
        }
    }
}

/// An API-level verdict on a 2xx JSON answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Use the answer.
    Ok,
    /// Rate limited or temporarily failing: retry (after this wait, else
    /// the server's headers, else the backoff).
    Retry {
        /// Wait asked for, if the body says.
        after: Option<Duration>,
        /// For the log and the final error (`ratelimited`).
        reason: String,
    },
    /// Credentials refused (`invalid_auth`).
    Auth(String),
    /// A final failure (`channel_not_found`).
    Fail(String),
    /// The answer lacks what the API promises.
    Malformed {
        /// JSON path (`$.ok`).
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// A verdict function for 2xx JSON answers.
pub type Check = fn(&Value) -> Verdict;

/// One request, re-buildable for every attempt.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Method.
    pub method: Method,
    /// Absolute URL (without the extra query pairs).
    pub url: Url,
    /// Query pairs added to the URL.
    pub query: Vec<(String, String)>,
    /// A form body (`application/x-www-form-urlencoded`).
    pub form: Option<Vec<(String, String)>>,
    /// A JSON body (`application/json`; Matrix `POST /login`).
    pub json: Option<Value>,
    /// Send the client's credentials (when the host allows).
    pub auth: bool,
    /// API-level verdict on 2xx answers.
    pub check: Option<Check>,
}

impl RequestSpec {
    /// A request with no query, no body, with credentials.
    pub fn new(method: Method, url: Url) -> RequestSpec {
        RequestSpec {
            method,
            url,
            query: Vec::new(),
            form: None,
            json: None,
            auth: true,
            check: None,
        }
    }

    /// Add a query pair.
    pub fn query(mut self, k: &str, v: impl Into<String>) -> RequestSpec {
        self.query.push((k.to_string(), v.into()));
        self
    }

    /// Set a query pair, replacing earlier ones of that name.
    pub fn set_query(&mut self, k: &str, v: impl Into<String>) {
        self.query.retain(|(n, _)| n != k);
        self.query.push((k.to_string(), v.into()));
    }

    /// Set a form body.
    pub fn form(mut self, form: Vec<(String, String)>) -> RequestSpec {
        self.form = Some(form);
        self
    }

    /// Set a JSON body.
    pub fn json_body(mut self, body: Value) -> RequestSpec {
        self.json = Some(body);
        self
    }

    /// A POST to `url` with a JSON body.
    pub fn post_json(url: Url, body: Value) -> RequestSpec {
        RequestSpec::new(Method::POST, url).json_body(body)
    }

    /// Send no credentials.
    pub fn without_auth(mut self) -> RequestSpec {
        self.auth = false;
        self
    }

    /// Judge 2xx JSON answers with `check`.
    pub fn check(mut self, check: Check) -> RequestSpec {
        self.check = Some(check);
        self
    }

    /// `METHOD /path` for logs and errors (no query, no host).
    pub fn endpoint(&self) -> String {
        format!("{} {}", self.method, self.url.path())
    }
}

/// A successful answer, body read.
#[derive(Debug, Clone)]
pub struct BytesResponse {
    /// Status (2xx).
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A successful JSON answer: the parsed value and the exact bytes.
#[derive(Debug, Clone)]
pub struct JsonResponse {
    /// Headers.
    pub headers: HeaderMap,
    /// Parsed body.
    pub value: Value,
    /// The body bytes as received.
    pub body: Bytes,
}

/// A downloaded file, spooled to an anonymous temporary file.
#[derive(Debug)]
pub struct Download {
    /// The content, positioned at the start.
    pub file: std::fs::File,
    /// Its size.
    pub size: u64,
    /// The `Content-Type` the server sent.
    pub content_type: Option<String>,
}

/// The HTTP client of one connector instance.
#[derive(Debug)]
pub struct HttpClient {
    source: String,
    base: Url,
    client: reqwest::Client,
    policy: RetryPolicy,
    bucket: Option<TokenBucket>,
    auth: Auth,
    auth_hosts: Vec<String>,
}

enum Body {
    Bytes(Bytes),
    Stream(reqwest::Response),
}

fn short(s: &str) -> String {
    let s = s.trim();
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// An API error code from a JSON error body (`error`, `error.code`,
/// `errcode`, `message`, `description`), shortened; other bodies are not
/// quoted (they may echo request data).
fn error_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    for p in [
        "error",
        "errcode",
        "error.code",
        "error.title",
        "message",
        "description",
    ] {
        if let Some(s) = json_path(&v, p).and_then(|x| x.as_str()) {
            return Some(short(s));
        }
    }
    None
}

impl HttpClient {
    /// A client for `source_name` rooted at `base_url`. `default_rate` is the
    /// connector's default requests per second (`None`: unlimited).
    pub fn new(
        source_name: &str,
        base_url: &str,
        opts: &HttpOptions,
        default_rate: Option<f64>,
        auth: Auth,
    ) -> Result<HttpClient, HttpError> {
        opts.validate()
            .map_err(|detail| HttpError::Config { detail })?;
        let mut base = Url::parse(base_url.trim()).map_err(|e| HttpError::Config {
            detail: format!("base_url {base_url:?}: {e}"),
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(HttpError::Config {
                detail: format!("base_url {base_url:?}: not an http(s) URL"),
            });
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let timeout = Duration::from_secs(opts.timeout_secs.unwrap_or(60));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| HttpError::Config {
                detail: format!("HTTP client: {e}"),
            })?;
        let rate = opts.requests_per_second.or(default_rate);
        let host = base.host_str().unwrap_or_default().to_string();
        Ok(HttpClient {
            source: source_name.to_string(),
            base,
            client,
            policy: opts.policy(),
            bucket: rate.map(|r| TokenBucket::new(r, opts.burst.unwrap_or(5))),
            auth,
            auth_hosts: vec![host],
        })
    }

    /// Also send credentials to `host` (file download hosts).
    pub fn allow_auth_host(&mut self, host: &str) {
        self.auth_hosts.push(host.to_ascii_lowercase());
    }

    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `path` relative to the base URL (`conversations.list`,
    /// `/api/v2/tickets.json`: a leading `/` is relative to the base too),
    /// or an absolute `http(s)` URL as is.
    pub fn url(&self, path: &str) -> Result<Url, HttpError> {
        if path.starts_with("http://") || path.starts_with("https://") {
            return Url::parse(path).map_err(|e| HttpError::Config {
                detail: format!("URL {:?}: {e}", path.split('?').next().unwrap_or_default()),
            });
        }
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| HttpError::Config {
                detail: format!("path {path:?}: {e}"),
            })
    }

    /// A GET of `path` (see [`HttpClient::url`]).
    pub fn get(&self, path: &str) -> Result<RequestSpec, HttpError> {
        Ok(RequestSpec::new(Method::GET, self.url(path)?))
    }

    /// Map an [`HttpError`] onto this source's [`ConnectorError`].
    pub fn err(&self, e: HttpError) -> ConnectorError {
        e.into_connector(&self.source)
    }

    fn sends_auth_to(&self, url: &Url) -> bool {
        url.host_str()
            .is_some_and(|h| self.auth_hosts.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }

    /// Send with retries; the body read in full.
    pub async fn execute_bytes(&self, spec: &RequestSpec) -> Result<BytesResponse, HttpError> {
        let (status, headers, body) = self.execute(spec, false).await?;
        match body {
            Body::Bytes(body) => Ok(BytesResponse {
                status,
                headers,
                body,
            }),
            Body::Stream(_) => unreachable!("bytes requested"),
        }
    }

    /// Send with retries and parse the JSON answer (after `spec.check`).
    pub async fn json(&self, spec: &RequestSpec) -> Result<JsonResponse, HttpError> {
        let (_, headers, body) = self.execute(spec, false).await?;
        let Body::Bytes(body) = body else {
            unreachable!("bytes requested")
        };
        let value = parse_json(&spec.endpoint(), &body)?;
        Ok(JsonResponse {
            headers,
            value,
            body,
        })
    }

    /// Download `url` (absolute, or relative to the base) into an anonymous
    /// temporary file; retried like any request (the whole download).
    pub async fn download(&self, url: &str) -> Result<Download, HttpError> {
        let spec = RequestSpec::new(Method::GET, self.url(url)?);
        let endpoint = spec.endpoint();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (_, headers, body) = self.execute(&spec, true).await?;
            let Body::Stream(resp) = body else {
                unreachable!("stream requested")
            };
            let content_type = headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.to_string());
            match spool(resp).await {
                Ok((file, size)) => {
                    return Ok(Download {
                        file,
                        size,
                        content_type,
                    })
                }
                Err(e) if attempt < self.policy.max_attempts => {
                    let wait = self.policy.backoff(attempt);
                    tracing::warn!(source = %self.source, endpoint = %endpoint, attempt, wait_ms = wait.as_millis() as u64, error = %e, "http download interrupted: retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    return Err(HttpError::Transport {
                        endpoint,
                        detail: format!("download failed after {attempt} attempts: {e}"),
                    })
                }
            }
        }
    }

    fn build(&self, spec: &RequestSpec, auth: Option<&str>) -> reqwest::RequestBuilder {
        let mut rb = self
            .client
            .request(spec.method.clone(), spec.url.clone())
            .header(USER_AGENT, concat!("custos/", env!("CARGO_PKG_VERSION")));
        if !spec.query.is_empty() {
            rb = rb.query(&spec.query);
        }
        if let Some(form) = &spec.form {
            rb = rb.form(form);
        }
        if let Some(json) = &spec.json {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.to_string());
        }
        if let Some(a) = auth {
            if let Ok(mut v) = HeaderValue::from_str(a) {
                v.set_sensitive(true);
                rb = rb.header(AUTHORIZATION, v);
            }
        }
        rb
    }

    /// The retry loop.
    async fn execute(
        &self,
        spec: &RequestSpec,
        stream: bool,
    ) -> Result<(StatusCode, HeaderMap, Body), HttpError> {
        let endpoint = spec.endpoint();
        let path = spec.url.path().to_string();
        let max = self.policy.max_attempts;
        let mut attempt: u32 = 0;
        let mut refreshed = false;
        loop {
            attempt += 1;
            if let Some(b) = &self.bucket {
                b.acquire().await;
            }
            let auth = if spec.auth && self.sends_auth_to(&spec.url) {
                self.auth.header(self).await?
            } else {
                None
            };
            let req = self.build(spec, auth.as_ref().map(|a| a.0.as_str()));
            let started = Instant::now();
            let sent = req.send().await;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            // (retryable reason, server-given wait, final error)
            let failure: (String, Option<Duration>, HttpError) = match sent {
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connection failed"
                    } else {
                        "request failed"
                    };
                    tracing::debug!(source = %self.source, method = %spec.method, path = %path, attempt, elapsed_ms, error = what, "http request");
                    // The error text may hold the URL with its query: not quoted.
                    (
                        what.to_string(),
                        None,
                        HttpError::Transport {
                            endpoint: endpoint.clone(),
                            detail: format!("{what} after {attempt} attempts"),
                        },
                    )
                }
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    tracing::debug!(source = %self.source, method = %spec.method, path = %path, status = status.as_u16(), attempt, elapsed_ms, "http request");
                    if status.is_success() && stream && spec.check.is_none() {
                        return Ok((status, headers, Body::Stream(resp)));
                    }
                    let body = match resp.bytes().await {
                        Ok(b) => b,
                        Err(e) => {
                            let what = if e.is_timeout() {
                                "timeout"
                            } else {
                                "body read failed"
                            };
                            let err = HttpError::Transport {
                                endpoint: endpoint.clone(),
                                detail: format!("{what} after {attempt} attempts"),
                            };
                            if attempt >= max {
                                return Err(err);
                            }
                            let wait = self.policy.backoff(attempt);
                            tracing::warn!(source = %self.source, endpoint = %endpoint, attempt, wait_ms = wait.as_millis() as u64, reason = what, "http retry");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    };
                    let code = status.as_u16();
                    if status.is_success() {
                        let Some(check) = spec.check else {
                            return Ok((status, headers, Body::Bytes(body)));
                        };
                        let value = parse_json(&endpoint, &body)?;
                        match check(&value) {
                            Verdict::Ok => return Ok((status, headers, Body::Bytes(body))),
                            Verdict::Auth(d) => {
                                return Err(HttpError::Auth {
                                    endpoint,
                                    detail: d,
                                })
                            }
                            Verdict::Fail(d) => {
                                return Err(HttpError::Transport {
                                    endpoint,
                                    detail: d,
                                })
                            }
                            Verdict::Malformed { path, detail } => {
                                return Err(HttpError::Malformed {
                                    endpoint,
                                    path,
                                    detail,
                                })
                            }
                            Verdict::Retry { after, reason } => {
                                let wait =
                                    after.or_else(|| retry::server_wait(429, &headers, &body));
                                (
                                    reason.clone(),
                                    wait,
                                    HttpError::Transport {
                                        endpoint: endpoint.clone(),
                                        detail: format!("{reason} after {attempt} attempts"),
                                    },
                                )
                            }
                        }
                    } else if code == 401 || code == 403 {
                        let code_txt = error_code(&body)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default();
                        if code == 401 && !refreshed {
                            if let (Auth::OAuth2(o), Some((_, generation))) = (&self.auth, &auth) {
                                refreshed = true;
                                tracing::info!(source = %self.source, endpoint = %endpoint, "http 401: refreshing the OAuth2 token");
                                o.refresh(self, *generation).await?;
                                attempt -= 1;
                                continue;
                            }
                        }
                        return Err(HttpError::Auth {
                            endpoint,
                            detail: format!("HTTP {status}{code_txt}"),
                        });
                    } else {
                        let code_txt = error_code(&body)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default();
                        let err = HttpError::Status {
                            endpoint: endpoint.clone(),
                            status: code,
                            detail: if matches!(code, 408 | 429) || status.is_server_error() {
                                format!(
                                    " {}{code_txt} after {attempt} attempts",
                                    status.canonical_reason().unwrap_or("")
                                )
                            } else {
                                format!(" {}{code_txt}", status.canonical_reason().unwrap_or(""))
                            },
                        };
                        if !(matches!(code, 408 | 429) || status.is_server_error()) {
                            return Err(err);
                        }
                        (
                            format!("HTTP {code}"),
                            retry::server_wait(code, &headers, &body),
                            err,
                        )
                    }
                }
            };
            let (reason, server, err) = failure;
            if attempt >= max {
                return Err(err);
            }
            let wait = match server {
                Some(w) if w > self.policy.max_wait => {
                    return Err(HttpError::Transport {
                        endpoint,
                        detail: format!(
                            "{reason}: the server asks to wait {}s, more than max_wait_secs ({}s)",
                            w.as_secs(),
                            self.policy.max_wait.as_secs()
                        ),
                    })
                }
                Some(w) => w,
                None => self.policy.backoff(attempt),
            };
            tracing::warn!(source = %self.source, endpoint = %endpoint, attempt, wait_ms = wait.as_millis() as u64, reason = %reason, server_asked = server.is_some(), "http retry");
            tokio::time::sleep(wait).await;
        }
    }
}

async fn spool(resp: reqwest::Response) -> Result<(std::fs::File, u64), String> {
    let mut file = tempfile::tempfile().map_err(|e| format!("temporary file: {e}"))?;
    let mut size = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                "timeout".to_string()
            } else {
                "body read failed".to_string()
            }
        })?;
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .map_err(|e| format!("temporary file: {e}"))?;
    }
    file.flush().map_err(|e| format!("temporary file: {e}"))?;
    file.rewind().map_err(|e| format!("temporary file: {e}"))?;
    Ok((file, size))
}

/// Parse a JSON body; errors name the endpoint and where parsing stopped.
pub fn parse_json(endpoint: &str, body: &[u8]) -> Result<Value, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::Malformed {
        endpoint: endpoint.to_string(),
        path: "$".into(),
        detail: format!("not JSON ({e})"),
    })
}

/// The value at a dotted path (`response_metadata.next_cursor`, `a.0.b`).
pub fn json_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Deserialize the value at `path` (required); errors name the endpoint and
/// the JSON path (`$.path`, plus serde's inner location).
pub fn take_at<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    v: &Value,
    path: &str,
) -> Result<T, HttpError> {
    let at = json_path(v, path).ok_or_else(|| HttpError::Malformed {
        endpoint: endpoint.to_string(),
        path: format!("$.{path}"),
        detail: "missing".into(),
    })?;
    T::deserialize(at).map_err(|e| HttpError::Malformed {
        endpoint: endpoint.to_string(),
        path: format!("$.{path}"),
        detail: e.to_string(),
    })
}
