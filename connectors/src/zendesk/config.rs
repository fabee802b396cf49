//! `type = "zendesk"` configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::{HttpOptions, OAuth2Config};

/// A Zendesk Support account. Authentication: an API token (`email` +
/// `api_token_*`, sent as `email/token:TOKEN` basic auth), an OAuth access
/// token (`oauth_token_*`, bearer), or an `[source.oauth2]` table (refresh
/// token / client credentials with automatic refresh). Exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZendeskConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// API root, e.g. `https://example.zendesk.com`; or give `subdomain`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The account's subdomain (`example` → `https://example.zendesk.com`).
    #[serde(default)]
    pub subdomain: Option<String>,
    /// Agent e-mail address for API token authentication.
    #[serde(default)]
    pub email: Option<String>,
    /// API token from this environment variable.
    #[serde(default)]
    pub api_token_env: Option<String>,
    /// API token from the first line of this file.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    /// API token from this shell command's standard output.
    #[serde(default)]
    pub api_token_command: Option<String>,
    /// OAuth access token from this environment variable.
    #[serde(default)]
    pub oauth_token_env: Option<String>,
    /// OAuth access token from the first line of this file.
    #[serde(default)]
    pub oauth_token_file: Option<PathBuf>,
    /// OAuth access token from this shell command's standard output.
    #[serde(default)]
    pub oauth_token_command: Option<String>,
    /// OAuth2 with refresh (token endpoint `…/oauth/tokens`).
    #[serde(default)]
    pub oauth2: Option<Box<OAuth2Config>>,
    /// Unix time the first export starts at; default 0 (every ticket).
    #[serde(default)]
    pub start_time: Option<i64>,
    /// Fetch each changed ticket's comments into its record; default true.
    #[serde(default)]
    pub comments: Option<bool>,
    /// Download the files attached to comments (`comments[].attachments[]`,
    /// from their `content_url`) into the record's attachments; default
    /// true. When false they are described only (name, type, size) and the
    /// URLs stay in the payload. Credentials go only to the base URL's host
    /// (and `attachment_auth_hosts`); content URLs on other hosts (such as
    /// `*.zdusercontent.com`) are fetched without them.
    #[serde(default)]
    pub download_attachments: Option<bool>,
    /// More hosts (exact names, e.g. `example.zendesk.com` behind a proxied
    /// `base_url`) that also get the credentials when an attachment is
    /// downloaded from them; default none.
    #[serde(default)]
    pub attachment_auth_hosts: Option<Vec<String>>,
    /// Rate limit, retries, timeouts (default 1 request/s, burst 5: the
    /// incremental export allows 10 a minute, answered with 429 +
    /// `Retry-After` beyond).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}
