//! `type = "matrix"` configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::HttpOptions;

/// A Matrix account read through the client-server API (`/sync`,
/// `/rooms/{id}/messages`). Authentication: an access token
/// (`access_token_*`), or `user` + `password_*` (a password login at the
/// first request of every run; each login creates a device on the server).
/// Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// The homeserver's client API root, e.g. `https://matrix.example.org`
    /// (the `/_matrix/client/v3/…` paths are appended).
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
    /// User to log in as (`@backup:example.org` or the localpart), with
    /// `password_*`; instead of an access token.
    #[serde(default)]
    pub user: Option<String>,
    /// Login password from this environment variable.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Login password from the first line of this file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Login password from this shell command's standard output.
    #[serde(default)]
    pub password_command: Option<String>,
    /// Rooms to back up, by id (`!abc:example.org`) or alias
    /// (`#support:example.org`); default: every joined room.
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
    /// Customer ids of senders: MXID → typed id
    /// (`"@ana:example.org" = "email:ana@example.org"`). Senders not listed
    /// get no customer id (e-mail 3pids of other users are not readable
    /// through the client-server API).
    #[serde(default)]
    pub customer_ids: Option<BTreeMap<String, String>>,
    /// Events per `/sync` timeline and per `/messages` page; default 100.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Rate limit, retries, timeouts (default 10 requests/s, burst 5;
    /// `M_LIMIT_EXCEEDED` answers are waited out per `retry_after_ms`).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}

impl MatrixConfig {
    /// Check the secret keys and the authentication choice.
    pub fn validate(&self) -> Result<(), String> {
        let token = crate::SecretRef::pick(
            "access_token",
            &self.access_token_env,
            &self.access_token_file,
            &self.access_token_command,
        )?;
        let password = crate::SecretRef::pick(
            "password",
            &self.password_env,
            &self.password_file,
            &self.password_command,
        )?;
        match (token.is_some(), self.user.is_some(), password.is_some()) {
            (true, false, false) | (false, true, true) => {}
            (true, _, _) => {
                return Err("give either access_token_* or user + password_*, not both".into())
            }
            (false, true, false) => {
                return Err(
                    "user needs one of password_env, password_file, password_command".into(),
                )
            }
            (false, false, true) => return Err("password_* needs user".into()),
            (false, false, false) => {
                return Err("give one of access_token_env, access_token_file, access_token_command (or user + password_*)".into())
            }
        }
        if self.base_url.trim().is_empty() {
            return Err("base_url is empty".into());
        }
        if self.rooms.as_ref().is_some_and(|r| r.is_empty()) {
            return Err("rooms is empty (leave it out for all joined rooms)".into());
        }
        if self.page_size == Some(0) {
            return Err("page_size must be at least 1".into());
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        Ok(())
    }
}
