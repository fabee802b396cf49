//! custos connectors: record sources (mail, chat, social, CRM, export files).
//!
//! Layout:
//! - [`record`]: the normalized [`Record`] and the [`Change`] stream items.
//! - [`Connector`] (this file): the one trait every source implements.
//! - one folder per source: [`imap`] (IMAP servers), [`files`] (mbox,
//!   Maildir, `.eml` folders, Slack exports, CSV and JSONL exports),
//!   [`slack`] (Slack Web API), [`zendesk`] (Zendesk Support API),
//!   [`matrix`] (Matrix client-server API), [`mastodon`] (Mastodon API),
//!   [`hubspot`] (HubSpot CRM v3), [`x`] (X API v2 mentions and DMs),
//!   [`rest`] (any REST/JSON API, configured).
//! - [`http`]: the HTTP layer the API connectors share (retries, rate
//!   limit, pagination, auth).
//! - [`config`]: the serde-tagged source configuration (the registry) and
//!   [`build`], which turns one entry into a connector.
//! - `conformance` (hidden): the suite every connector runs in tests.
//!
//! Contract of [`Connector::sync`]: given the cursor the previous successful
//! sync of a collection returned (or none), push the changes since then into
//! the sink and return the new cursor. The caller commits the records and the
//! new cursor together (in one snapshot), so a sync interrupted at any point is
//! simply repeated from the old cursor: connectors must be idempotent from a
//! cursor, and an unusable cursor must lead to `Change::Reset` + a full
//! listing, never to an error or a silent gap.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
#[doc(hidden)]
pub mod conformance;
pub mod files;
pub mod http;
pub mod hubspot;
pub mod ids;
pub mod imap;
pub mod mastodon;
pub mod matrix;
mod mime;
pub mod record;
pub mod rest;
pub mod slack;
#[cfg(test)]
mod testgen;
pub mod x;
pub mod zendesk;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{build, source_types, SecretRef, SourceConfig};
pub use record::{Attachment, Change, Payload, Record, RecordKind};

/// Errors a connector reports. Messages name the source, collection or record
/// id, never content or secrets.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Credentials were refused.
    #[error("{source_name}: authentication failed: {detail}")]
    Auth {
        /// The configured source name.
        source_name: String,
        /// What was refused (server answer, unreadable secret); never the secret.
        detail: String,
    },
    /// The source could not be reached or answered unexpectedly.
    #[error("{source_name}: {detail}")]
    Unavailable {
        /// The configured source name.
        source_name: String,
        /// What failed.
        detail: String,
    },
    /// Input that cannot be understood (a malformed export file …).
    #[error("{source_name}: {what}: {detail}")]
    Malformed {
        /// The configured source name.
        source_name: String,
        /// What is malformed (a file path, `configuration`).
        what: String,
        /// How.
        detail: String,
    },
    /// The sink (custos) failed; the sync stops.
    #[error("{0}")]
    Sink(String),
    /// Local file access failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ConnectorError {
    /// A sync asked for a collection the source does not have.
    pub fn unknown_collection(source_name: &str, collection: &str) -> Self {
        ConnectorError::Unavailable {
            source_name: source_name.to_string(),
            detail: format!("unknown collection {collection:?}"),
        }
    }
}

/// Result alias.
pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

/// What a connector can report; the conformance suite checks each claim, and
/// sources that cannot report deletions or edits get periodic full
/// reconciliation from the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Incremental syncs report deleted records.
    pub reports_deletions: bool,
    /// Incremental syncs report edited records.
    pub reports_edits: bool,
    /// Records may carry attachments.
    pub has_attachments: bool,
    /// Metadata-only changes (flags) arrive as `Change::UpdateMeta`.
    pub metadata_updates: bool,
}

/// A collection of a source (mail folder, channel, room, object type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    /// Stable id; safe as a file name component.
    pub id: String,
    /// Display name (mail folder path, channel name).
    pub name: String,
}

/// Result of a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Human summary (`IMAP 127.0.0.1:143: 3 folders`).
    pub summary: String,
}

/// A cursor: opaque JSON owned by the connector, stored encrypted by custos.
pub type Cursor = serde_json::Value;

/// Receives the changes of one collection.
#[async_trait]
pub trait ChangeSink: Send {
    /// Take one change. An error stops the sync (it is returned as `ConnectorError::Sink`).
    async fn push(&mut self, change: Change) -> Result<()>;
}

/// A source of records.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The configured source name.
    fn name(&self) -> &str;
    /// What this connector reports.
    fn capabilities(&self) -> Capabilities;
    /// Credentials and reachability.
    async fn check(&self) -> Result<Health>;
    /// Collections to back up (configured subset or all).
    async fn collections(&self) -> Result<Vec<Collection>>;
    /// Push the changes of `collection` since `cursor` into `sink`; return the new cursor.
    async fn sync(
        &self,
        collection: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor>;
}
