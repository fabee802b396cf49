//! `type = "hubspot"` configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::{HttpOptions, OAuth2Config};

/// A HubSpot account (CRM v3). Authentication: a private app access token
/// (`access_token_*`, sent as a bearer token) or an `[source.oauth2]` table
/// (refresh token with automatic refresh on 401, token endpoint
/// `https://api.hubapi.com/oauth/v1/token`). Exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpotConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// API root; default `https://api.hubapi.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Private app access token from this environment variable.
    #[serde(default)]
    pub access_token_env: Option<String>,
    /// Private app access token from the first line of this file.
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
    /// Private app access token from this shell command's standard output.
    #[serde(default)]
    pub access_token_command: Option<String>,
    /// OAuth2 with refresh (a rotated refresh token goes to `token_file`).
    #[serde(default)]
    pub oauth2: Option<Box<OAuth2Config>>,
    /// Object types to back up, a subset of `contacts`, `emails`, `notes`,
    /// `calls`, `tasks`, `communications`; default all of them.
    #[serde(default)]
    pub object_types: Option<Vec<String>>,
    /// Extra properties to request per object type (`{ contacts =
    /// ["lifecyclestage"] }`), added to the built-in list.
    #[serde(default)]
    pub properties: Option<BTreeMap<String, Vec<String>>>,
    /// Objects per search page, 1..=200; default 100.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Results one search can page through before the time window is
    /// restarted from the last seen modification time; default 10000 (the
    /// CRM search API's limit). Lower it only for tests.
    #[serde(default)]
    pub search_limit: Option<u32>,
    /// Rate limit, retries, timeouts (default 4 requests/s: the search API
    /// allows 5 per second per account, answered with 429 beyond).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}
