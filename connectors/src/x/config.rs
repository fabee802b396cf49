//! `type = "x"` configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::{HttpOptions, OAuth2Config};

/// An X (Twitter) account through the X API v2. Authentication: a bearer
/// token (`bearer_token_*`: an OAuth 2.0 user access token, or an app-only
/// token for mentions with `user_id` set) or an `[source.oauth2]` table
/// (user-context refresh token with `offline.access`; X rotates the refresh
/// token on every refresh, so give `token_file`). Exactly one. Direct
/// messages need user context with the `dm.read` scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// API root; default `https://api.x.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Bearer token from this environment variable.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Bearer token from the first line of this file.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Bearer token from this shell command's standard output.
    #[serde(default)]
    pub bearer_token_command: Option<String>,
    /// OAuth2 user context with refresh (token endpoint
    /// `https://api.x.com/2/oauth2/token`).
    #[serde(default)]
    pub oauth2: Option<Box<OAuth2Config>>,
    /// The account's numeric user id; default: asked from `/2/users/me`
    /// (needs a user-context token).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Collections to back up, a subset of `mentions`, `dm_events`; default
    /// both.
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    /// Items per page (`max_results`), 5..=100; default 100.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Rate limit, retries, timeouts (default 0.2 requests/s: mentions
    /// allow 180 requests per 15 minutes per user, answered with 429 and
    /// `x-rate-limit-reset` beyond; raise `max_wait_secs` to 900 to wait
    /// out a whole window instead of failing).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}
