//! `type = "eml_folder"`: a folder (searched recursively) of `.eml` files.
//!
//! One collection (id from the folder's name); record id = the file's path
//! relative to the folder, `/`-separated, encoded with
//! [`crate::ids::record_id`] (`2024/a b.eml` → `2024=2Fa=20b.eml`). Payload
//! = the file's bytes; files over `stream_threshold_mib` (default 8) are
//! streamed from disk with their metadata parsed from the first MiB, as for
//! Maildir (see [`super::maildir`]). Sync: full listing each time (`Reset`); files not
//! changed since the previous sync are `Keep` without being read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::maildir::{
    build_email_record, file_time, list_one, Listed, ListingCursor, WATERMARK_MARGIN_NS,
};
use super::{io_err, now_ns, FILE_CURSOR_VERSION};
use crate::ids::{collection_id, record_id};
use crate::{Capabilities, Change, ChangeSink, Collection, Connector, Cursor, Health, Result};

/// A folder of `.eml` files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmlFolderConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// The folder; `.eml` files below it (any depth) are records.
    pub path: PathBuf,
    /// Messages larger than this many MiB are streamed from the file instead
    /// of being read into memory; default 8.
    #[serde(default)]
    pub stream_threshold_mib: Option<u64>,
}

/// The `.eml` folder connector.
#[derive(Debug)]
pub struct EmlFolderConnector {
    cfg: EmlFolderConfig,
}

impl EmlFolderConnector {
    /// A connector for `cfg`.
    pub fn new(cfg: EmlFolderConfig) -> EmlFolderConnector {
        EmlFolderConnector { cfg }
    }

    fn collection(&self) -> Collection {
        let name = self
            .cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "eml".into());
        Collection {
            id: collection_id(&name),
            name,
        }
    }
}

/// Every `.eml` file below `root`, as (relative `/` path, path), sorted.
fn eml_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e.eq_ignore_ascii_case("eml"))
            {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[async_trait]
impl Connector for EmlFolderConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: true,
            reports_edits: true,
            has_attachments: true,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        let n = eml_files(&self.cfg.path)?.len();
        Ok(Health {
            summary: format!("eml folder {}: {n} files", self.cfg.path.display()),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        if !self.cfg.path.is_dir() {
            return Err(io_err(
                &self.cfg.path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        Ok(vec![self.collection()])
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let started = now_ns() - WATERMARK_MARGIN_NS;
        let files = eml_files(&self.cfg.path)?;
        let old = ListingCursor::load(cursor, "eml_folder", &coll.id);
        sink.push(Change::Reset).await?;
        let mut skipped = Vec::new();
        let (mut kept, mut read) = (0usize, 0usize);
        for (rel, path) in files {
            let Ok(md) = std::fs::metadata(&path) else {
                continue;
            };
            let id = record_id(&rel);
            let threshold = crate::mime::stream_threshold(self.cfg.stream_threshold_mib);
            match list_one(
                &self.cfg.name,
                &coll.id,
                old.as_ref(),
                &rel,
                &path,
                &md,
                threshold,
            ) {
                Listed::Keep => {
                    kept += 1;
                    sink.push(Change::Keep { id }).await?;
                }
                Listed::Skipped => skipped.push(rel),
                Listed::Read(content) => {
                    read += 1;
                    let mut meta = BTreeMap::new();
                    meta.insert("path".into(), rel.clone());
                    let rec =
                        build_email_record(&self.cfg.name, coll, id, content, meta, file_time(&md));
                    sink.push(Change::Upsert(rec)).await?;
                }
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, kept, read, skipped = skipped.len(), "eml folder: listed");
        let cur = ListingCursor {
            v: FILE_CURSOR_VERSION,
            kind: "eml_folder".into(),
            collection: coll.id.clone(),
            watermark_ns: started,
            skipped,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
