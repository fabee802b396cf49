//! `type = "mastodon"` configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::HttpOptions;

/// A Mastodon account read through the REST API with an access token
/// (scope `read:notifications read:statuses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MastodonConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// The instance, e.g. `https://mastodon.social` (`/api/v1/…` is appended).
    pub base_url: String,
    /// Access token from this environment variable.
    #[serde(default)]
    pub access_token_env: Option<String>,
    /// Access token from the first line of this file.
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
    /// Access token from this shell command's standard output.
    #[serde(default)]
    pub access_token_command: Option<String>,
    /// What to back up: `mentions` (notifications of type mention) and/or
    /// `direct` (direct-message conversations); default both.
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    /// Rate limit, retries, timeouts (default 5 requests/s, burst 5:
    /// Mastodon allows 300 requests per 5 minutes per token).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}

/// The collections a Mastodon source knows.
pub const COLLECTIONS: [&str; 2] = ["mentions", "direct"];

impl MastodonConfig {
    /// Check the secret keys and the collection names.
    pub fn validate(&self) -> Result<(), String> {
        crate::SecretRef::pick(
            "access_token",
            &self.access_token_env,
            &self.access_token_file,
            &self.access_token_command,
        )?
        .ok_or("give one of access_token_env, access_token_file, access_token_command")?;
        if self.base_url.trim().is_empty() {
            return Err("base_url is empty".into());
        }
        if let Some(c) = &self.collections {
            if c.is_empty() {
                return Err("collections is empty (leave it out for both)".into());
            }
            if let Some(bad) = c.iter().find(|c| !COLLECTIONS.contains(&c.as_str())) {
                return Err(format!(
                    "collections: unknown {bad:?} (known: mentions, direct)"
                ));
            }
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        Ok(())
    }
}
