//! Sealed metadata objects (index, snapshot, prune marks, verification
//! records; later ledgers).
//!
//! Stored bytes = metadata-key sealed box, associated data
//! `custos/v1/<kind>`, of the zstd-compressed JSON document. The object is
//! named `<kind folder>/<hex>` where hex is the BLAKE3 of the stored bytes,
//! so names never collide and any copy can be checked without a key.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crypto::{KeyUse, Keys};
use crate::error::{Error, Result};
use crate::id::Id;

/// Kinds of sealed metadata objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// `index/<id>`: blob → pack locations.
    Index,
    /// `snapshots/<id>`: one snapshot.
    Snapshot,
    /// `marks/<id>`: packs and index objects prune will delete after the grace period.
    Mark,
    /// `verifications/<id>`: the result of one `restore-verify` run on one target.
    Verification,
    /// `holds/<id>`: a legal hold placed or released.
    Hold,
    /// `disposals/<id>`: one entry of the record disposal log.
    Disposal,
    /// `customers/<id>`: the customer index (a snapshot's index or one partition's part).
    Customer,
    /// `suppressions/<id>`: one entry of the suppression ledger (erased customers).
    Suppression,
    /// `erasures/<id>`: the record of one customer erasure.
    Erasure,
    /// `audit/<seq>-<id>`: one entry of the audit trail.
    Audit,
    /// `removals/<id>`: objects forget or prune deleted (never copied back by sync).
    Removal,
}

impl ObjectKind {
    /// Folder (name prefix) of this kind.
    pub fn folder(self) -> &'static str {
        match self {
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Mark => "marks",
            ObjectKind::Verification => "verifications",
            ObjectKind::Hold => "holds",
            ObjectKind::Disposal => "disposals",
            ObjectKind::Customer => "customers",
            ObjectKind::Suppression => "suppressions",
            ObjectKind::Erasure => "erasures",
            ObjectKind::Audit => "audit",
            ObjectKind::Removal => "removals",
        }
    }

    fn ad(self) -> &'static [u8] {
        match self {
            ObjectKind::Index => b"custos/v1/index",
            ObjectKind::Snapshot => b"custos/v1/snapshot",
            ObjectKind::Mark => b"custos/v1/mark",
            ObjectKind::Verification => b"custos/v1/verification",
            ObjectKind::Hold => b"custos/v1/hold",
            ObjectKind::Disposal => b"custos/v1/disposal",
            ObjectKind::Customer => b"custos/v1/customer",
            ObjectKind::Suppression => b"custos/v1/suppression",
            ObjectKind::Erasure => b"custos/v1/erasure",
            ObjectKind::Audit => b"custos/v1/audit",
            ObjectKind::Removal => b"custos/v1/removal",
        }
    }

    /// Full object name for id.
    pub fn name(self, id: &Id) -> String {
        format!("{}/{}", self.folder(), id)
    }
}

/// Serialize, compress and seal `doc`; returns (id, bytes).
pub fn seal_object<T: Serialize>(keys: &Keys, kind: ObjectKind, doc: &T) -> (Id, Bytes) {
    let json = serde_json::to_vec(doc).expect("metadata serializes");
    let compressed = zstd::bulk::compress(&json, 3).expect("zstd on memory cannot fail");
    let sealed = keys.seal(KeyUse::Metadata, kind.ad(), &compressed);
    (Id::of_object(&sealed), Bytes::from(sealed))
}

/// Check name, open, decompress and parse a sealed object.
pub fn open_object<T: DeserializeOwned>(
    keys: &Keys,
    kind: ObjectKind,
    id: &Id,
    bytes: &[u8],
) -> Result<T> {
    let name = kind.name(id);
    if Id::of_object(bytes) != *id {
        return Err(Error::corrupt(
            &name,
            "bytes do not hash to the object name",
        ));
    }
    let compressed = keys
        .open(KeyUse::Metadata, kind.ad(), bytes)
        .ok_or_else(|| Error::corrupt(&name, "authentication failed"))?;
    let json = zstd::stream::decode_all(&compressed[..])
        .map_err(|e| Error::corrupt(&name, format!("zstd: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(&name, format!("json: {e}")))
}
