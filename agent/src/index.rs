//! The index: which pack holds each blob, at which offset.
//!
//! Index objects (`index/<id>`) are written by each backup after its packs
//! and before its snapshot; readers load and merge all of them. In memory the
//! merged index is a hash map from blob id to a compact 16-byte location.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::blob::BlobType;
use crate::id::Id;
use crate::pack::{pack_object_name, FinishedPack};

/// The JSON document of an index object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IndexFile {
    /// Packs described by this index object.
    pub packs: Vec<IndexPack>,
}

/// One pack in an index object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IndexPack {
    /// Pack id (BLAKE3 of the pack object).
    pub id: Id,
    /// Type of every blob in the pack.
    #[serde(rename = "type")]
    pub ty: BlobType,
    /// Size of the pack object in bytes.
    pub size: u64,
    /// Blobs in pack order.
    pub blobs: Vec<IndexBlob>,
}

/// One blob in an index object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IndexBlob {
    pub id: Id,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

impl IndexPack {
    /// Index entry for a pack just written.
    pub fn from_finished(p: &FinishedPack) -> IndexPack {
        IndexPack {
            id: p.id,
            ty: p.ty,
            size: p.bytes.len() as u64,
            blobs: p
                .entries
                .iter()
                .map(|e| IndexBlob {
                    id: e.id,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                })
                .collect(),
        }
    }

    /// The pack's object name.
    pub fn object_name(&self) -> String {
        pack_object_name(self.ty, &self.id)
    }
}

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub ty: BlobType,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

impl BlobLocation {
    /// Object name of the pack.
    pub fn pack_name(&self) -> String {
        pack_object_name(self.ty, &self.pack)
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// Merged in-memory index.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<(Id, BlobType, u64)>,
    pack_pos: HashMap<Id, u32>,
    blobs: HashMap<Id, Loc>,
}

impl Index {
    /// Add every pack of an index document.
    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.add_pack(p);
        }
    }

    /// Add one pack (idempotent).
    pub fn add_pack(&mut self, p: &IndexPack) {
        if self.pack_pos.contains_key(&p.id) {
            return;
        }
        let pos = self.packs.len() as u32;
        self.packs.push((p.id, p.ty, p.size));
        self.pack_pos.insert(p.id, pos);
        for b in &p.blobs {
            self.blobs.entry(b.id).or_insert(Loc {
                pack: pos,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
            });
        }
    }

    /// Is this blob stored?
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// Location of a blob.
    pub fn get(&self, id: &Id) -> Option<BlobLocation> {
        let l = self.blobs.get(id)?;
        let (pack, ty, _) = self.packs[l.pack as usize];
        Some(BlobLocation {
            pack,
            ty,
            offset: l.offset,
            length: l.length,
            raw_length: l.raw_length,
        })
    }

    /// (distinct blobs, their total plaintext bytes).
    pub fn totals(&self) -> (usize, u64) {
        (
            self.blobs.len(),
            self.blobs.values().map(|l| u64::from(l.raw_length)).sum(),
        )
    }

    /// Number of distinct blobs.
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// All packs: (id, type, size).
    pub fn packs(&self) -> &[(Id, BlobType, u64)] {
        &self.packs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_location_wins_and_packs_are_idempotent() {
        let a = Id::of_object(b"a");
        let blob = Id::of_object(b"blob");
        let p1 = IndexPack {
            id: a,
            ty: BlobType::Data,
            size: 100,
            blobs: vec![IndexBlob {
                id: blob,
                offset: 0,
                length: 50,
                raw_length: 40,
            }],
        };
        let mut p2 = p1.clone();
        p2.id = Id::of_object(b"b");
        p2.blobs[0].offset = 10;
        let mut idx = Index::default();
        idx.add_pack(&p1);
        idx.add_pack(&p1);
        idx.add_pack(&p2);
        assert_eq!(idx.packs().len(), 2);
        let loc = idx.get(&blob).unwrap();
        assert_eq!((loc.pack, loc.offset), (a, 0));
        assert!(!idx.contains(&Id::of_object(b"none")));
    }
}
