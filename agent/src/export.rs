//! `export`: records in open formats — `.eml` files (every record as its
//! original payload), one mboxrd file (email records), or JSON Lines (one
//! object per record with its metadata and payload).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::records::keys;
use crate::repo::Repository;
use crate::snapshot::SnapshotEntry;
use crate::tree::Node;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A directory: `<source>/<collection>/<partition>/<record>` original payloads.
    Eml,
    /// One mboxrd file of the email records.
    Mbox,
    /// One JSON object per line.
    Jsonl,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "eml" => Ok(Format::Eml),
            "mbox" => Ok(Format::Mbox),
            "jsonl" => Ok(Format::Jsonl),
            other => Err(Error::Invalid(format!(
                "--format {other:?}: use eml, mbox or jsonl"
            ))),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Default, serde::Serialize)]
pub struct ExportReport {
    pub records: u64,
    pub bytes: u64,
    /// Records left out (mbox takes email only).
    pub skipped: u64,
}

/// One record to export: the snapshot it comes from, its path and node.
pub type Item<'a> = (&'a SnapshotEntry, String, Node);

async fn payload(repo: &Repository, index: &Index, node: &Node) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(node.size as usize);
    for b in &node.content {
        out.extend(repo.read_blob(index, BlobType::Data, b).await?);
    }
    Ok(out)
}

fn created(node: &Node) -> DateTime<Utc> {
    node.meta
        .get(keys::CREATED)
        .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Write `items` to `out` in `format`.
pub async fn export(
    repo: &Repository,
    index: &Index,
    items: &[Item<'_>],
    format: Format,
    out: &Path,
) -> Result<ExportReport> {
    repo.require(crate::crypto::Role::Restore, "export")?;
    let mut report = ExportReport::default();
    match format {
        Format::Eml => {
            for (snap, path, node) in items {
                let data = payload(repo, index, node).await?;
                let dest: PathBuf = out.join(&snap.snapshot.source).join(path);
                if dest
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(Error::Invalid(format!(
                        "refusing unsafe record path {path}"
                    )));
                }
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                std::fs::write(&dest, &data).map_err(|e| Error::io(&dest, e))?;
                report.records += 1;
                report.bytes += data.len() as u64;
            }
        }
        Format::Mbox | Format::Jsonl => {
            let file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
            let mut w = std::io::BufWriter::new(file);
            for (snap, path, node) in items {
                let is_email = node.meta.get(keys::KIND).map(String::as_str) == Some("email");
                if format == Format::Mbox && !is_email {
                    report.skipped += 1;
                    continue;
                }
                let data = payload(repo, index, node).await?;
                let bytes = if format == Format::Mbox {
                    let sender = node
                        .meta
                        .get(keys::PARTICIPANTS)
                        .and_then(|p| serde_json::from_str::<Vec<String>>(p).ok())
                        .and_then(|p| p.into_iter().next())
                        .unwrap_or_default();
                    custos_connectors::files::mbox_entry(&sender, created(node), &data)
                } else {
                    let mut line = serde_json::json!({
                        "source": snap.snapshot.source,
                        "snapshot_id": snap.id,
                        "path": path,
                        "record_id": node.meta.get(keys::RECORD_ID),
                        "kind": node.meta.get(keys::KIND),
                        "created": node.meta.get(keys::CREATED),
                        "digest": node.digest,
                        "meta": node.meta,
                    });
                    match serde_json::from_slice::<serde_json::Value>(&data) {
                        Ok(v)
                            if node.meta.get(keys::PAYLOAD_EXT).map(String::as_str)
                                == Some("json") =>
                        {
                            line["payload"] = v
                        }
                        _ => match String::from_utf8(data.clone()) {
                            Ok(s) => line["payload_text"] = serde_json::Value::String(s),
                            Err(_) => {
                                line["payload_base64"] =
                                    serde_json::Value::String(B64.encode(&data))
                            }
                        },
                    }
                    let mut b = serde_json::to_vec(&line).expect("json");
                    b.push(b'\n');
                    b
                };
                w.write_all(&bytes).map_err(|e| Error::io(out, e))?;
                report.records += 1;
                report.bytes += data.len() as u64;
            }
            w.flush().map_err(|e| Error::io(out, e))?;
        }
    }
    Ok(report)
}
