//! Restore into the source: email records appended back into an IMAP
//! mailbox, with their flags and internal dates, so that recovering a mailbox
//! means the mailbox works again — not a folder of files.

use std::collections::BTreeMap;

use custos_connectors::imap::{ImapConfig, ImapConnector};

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::find::{records, Filter};
use crate::id::Id;
use crate::index::Index;
use crate::records::keys;
use crate::repo::Repository;

/// What a restore into IMAP did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ToSourceReport {
    /// Messages appended, per folder.
    pub appended: BTreeMap<String, u64>,
    /// Records skipped: (path, why) — not email, or deleted at the source.
    pub skipped: Vec<(String, String)>,
    pub errors: Vec<String>,
}

/// Append every email record under `tree` to the IMAP server of `config`:
/// into `folder` when given, else back into the folder it came from.
/// Records marked deleted at the source are skipped unless `include_deleted`.
pub async fn restore_to_imap(
    repo: &Repository,
    index: &Index,
    tree: Id,
    config: &ImapConfig,
    folder: Option<&str>,
    include_deleted: bool,
) -> Result<ToSourceReport> {
    repo.require(crate::crypto::Role::Restore, "restore --to-source")?;
    let imap = ImapConnector::new(config.clone()).map_err(|e| Error::Config(e.to_string()))?;
    let mut report = ToSourceReport::default();
    let mut created: Vec<String> = Vec::new();
    for (path, node) in records(repo, index, tree, &Filter::default()).await? {
        if node.meta.get(keys::KIND).map(String::as_str) != Some("email") {
            report.skipped.push((path, "not an email record".into()));
            continue;
        }
        if node.meta.contains_key(keys::DELETED) && !include_deleted {
            report.skipped.push((path, "deleted at the source".into()));
            continue;
        }
        // Source metadata without the `m.` prefix is what the connector wrote.
        let meta: BTreeMap<String, String> = node
            .meta
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(keys::SOURCE_META)
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        let dest = folder
            .map(str::to_string)
            .or_else(|| meta.get("folder").cloned())
            .unwrap_or_else(|| "INBOX".into());
        if !created.contains(&dest) {
            imap.create_folder_if_missing(&dest)
                .await
                .map_err(|e| Error::Failed(format!("IMAP folder {dest}: {e}")))?;
            created.push(dest.clone());
        }
        let mut raw = Vec::with_capacity(node.size as usize);
        for b in &node.content {
            raw.extend(repo.read_blob(index, BlobType::Data, b).await?);
        }
        match imap.append_with_meta(&dest, &raw, &meta).await {
            Ok(()) => *report.appended.entry(dest).or_default() += 1,
            Err(e) => report.errors.push(format!("{path}: {e}")),
        }
    }
    Ok(report)
}
