//! `type = "slack"` configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::HttpOptions;

/// A Slack workspace read through the Web API with a bot or user token
/// (scopes: `channels:read`, `channels:history`, `groups:read`,
/// `groups:history`, `users:read`, `users:read.email`, `files:read`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// Web API root; default `https://slack.com/api/`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Token (`xoxb-…` / `xoxp-…`) from this environment variable.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Token from the first line of this file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Token from this shell command's standard output.
    #[serde(default)]
    pub token_command: Option<String>,
    /// Conversations to back up, by id (`C0123…`) or name (`support`);
    /// default: every conversation the token is a member of.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// `conversations.list` types; default `public_channel,private_channel`
    /// (add `mpim,im` for direct messages).
    #[serde(default)]
    pub types: Option<String>,
    /// Hours of recent history re-read at every sync: edits in it are sent
    /// again as updates, messages gone from it as deletions; default 48.
    /// Older edits and deletions are only seen by the periodic full
    /// reconciliation (`reconcile_every`).
    #[serde(default)]
    pub recent_window_hours: Option<u64>,
    /// Days during which a thread's parent is watched for new replies
    /// (its `latest_reply`); default 14.
    #[serde(default)]
    pub thread_lookback_days: Option<u64>,
    /// Read `users.list` for names and e-mail addresses (customer ids);
    /// default true. Without `users:read.email` the addresses are missing.
    #[serde(default)]
    pub resolve_users: Option<bool>,
    /// Download the files attached to messages (`url_private`, with the
    /// token); default true. When false, files are described only.
    #[serde(default)]
    pub download_files: Option<bool>,
    /// Rate limit, retries, timeouts (default 1 request/s, burst 5: Slack's
    /// tier 3 methods allow about 50 a minute).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}
