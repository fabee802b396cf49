//! The index: which pack holds each blob, at which offset.
//!
//! Index objects (`index/<id>`) are written by each backup after its packs
//! and before its snapshot; readers load and merge all of them. In memory the
//! merged index is a hash map from blob id to a compact 16-byte location.

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

/// One blob in the merged index: 32 bytes (issue target: ≤ 40 bytes per blob).
///
/// Only the first 128 bits of the blob id are kept in memory. Two different
/// blobs of one repository sharing a 128-bit prefix would be treated as one:
/// the chance is about n²/2¹²⁹ for n blobs (10⁻²⁰ at a billion blobs), and ids
/// are keyed hashes, so nobody without the key can aim for a collision. Reads
/// still authenticate the full 256-bit id.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u128,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

pub(crate) fn key_of(id: &Id) -> u128 {
    u128::from_be_bytes(id.0[..16].try_into().expect("16 bytes"))
}

/// Collects index documents; [`IndexBuilder::build`] sorts once.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    packs: Vec<(Id, BlobType, u64)>,
    pack_seen: std::collections::HashSet<Id>,
    entries: Vec<Entry>,
}

impl IndexBuilder {
    /// Add every pack of an index document (a pack seen before is ignored).
    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            if !self.pack_seen.insert(p.id) {
                continue;
            }
            let pos = self.packs.len() as u32;
            self.packs.push((p.id, p.ty, p.size));
            self.entries.extend(p.blobs.iter().map(|b| Entry {
                key: key_of(&b.id),
                pack: pos,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
            }));
        }
    }

    /// Sort by id; where a blob is in several packs the first added wins.
    pub fn build(self) -> Index {
        self.build_avoiding(&std::collections::HashSet::new())
    }

    /// As [`IndexBuilder::build`], but a blob also stored outside the `avoid`
    /// packs (those prune marked for deletion) is located outside them.
    pub fn build_avoiding(self, avoid: &std::collections::HashSet<Id>) -> Index {
        let mut entries = self.entries;
        let doomed: Vec<bool> = self
            .packs
            .iter()
            .map(|(id, _, _)| avoid.contains(id))
            .collect();
        // stable: among equally preferred copies the first added stays first
        entries.sort_by_key(|e| (e.key, doomed[e.pack as usize]));
        entries.dedup_by_key(|e| e.key);
        entries.shrink_to_fit();
        Index {
            packs: self.packs,
            entries,
        }
    }
}

/// Merged in-memory index: a sorted table searched by binary search.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<(Id, BlobType, u64)>,
    entries: Vec<Entry>,
}

impl Index {
    /// Build from documents in one go.
    pub fn from_files<'a>(files: impl IntoIterator<Item = &'a IndexFile>) -> Index {
        let mut b = IndexBuilder::default();
        for f in files {
            b.add_file(f);
        }
        b.build()
    }

    fn find(&self, id: &Id) -> Option<&Entry> {
        let key = key_of(id);
        self.entries
            .binary_search_by_key(&key, |e| e.key)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Is this blob stored?
    pub fn contains(&self, id: &Id) -> bool {
        self.find(id).is_some()
    }

    /// Location of a blob.
    pub fn get(&self, id: &Id) -> Option<BlobLocation> {
        let e = self.find(id)?;
        let (pack, ty, _) = self.packs[e.pack as usize];
        Some(BlobLocation {
            pack,
            ty,
            offset: e.offset,
            length: e.length,
            raw_length: e.raw_length,
        })
    }

    /// (distinct blobs, their total plaintext bytes).
    pub fn totals(&self) -> (usize, u64) {
        (
            self.entries.len(),
            self.entries.iter().map(|e| u64::from(e.raw_length)).sum(),
        )
    }

    /// Number of distinct blobs.
    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// All packs: (id, type, size).
    pub fn packs(&self) -> &[(Id, BlobType, u64)] {
        &self.packs
    }

    /// Bytes of memory held by the blob table (for the ≤ 40 B/blob budget).
    pub fn table_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// Bytes of memory the index holds: the blob table plus the pack list.
    pub fn memory_bytes(&self) -> usize {
        self.table_bytes() + self.packs.capacity() * std::mem::size_of::<(Id, BlobType, u64)>()
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
        let f1 = IndexFile {
            packs: vec![p1.clone(), p1],
        };
        let f2 = IndexFile { packs: vec![p2] };
        let idx = Index::from_files([&f1, &f2]);
        assert_eq!(idx.packs().len(), 2);
        let loc = idx.get(&blob).unwrap();
        assert_eq!((loc.pack, loc.offset), (a, 0));
        assert!(!idx.contains(&Id::of_object(b"none")));
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn lookups_find_every_blob_of_many_packs() {
        let files: Vec<IndexFile> = (0..50u32)
            .map(|p| IndexFile {
                packs: vec![IndexPack {
                    id: Id::of_object(&p.to_le_bytes()),
                    ty: BlobType::Data,
                    size: 1,
                    blobs: (0..200u32)
                        .map(|b| IndexBlob {
                            id: Id::of_object(&(p * 1000 + b).to_le_bytes()),
                            offset: b,
                            length: 1,
                            raw_length: 2,
                        })
                        .collect(),
                }],
            })
            .collect();
        let idx = Index::from_files(&files);
        assert_eq!(idx.blob_count(), 10_000);
        for p in 0..50u32 {
            for b in (0..200u32).step_by(7) {
                let loc = idx
                    .get(&Id::of_object(&(p * 1000 + b).to_le_bytes()))
                    .unwrap();
                assert_eq!((loc.pack, loc.offset), (Id::of_object(&p.to_le_bytes()), b));
            }
        }
        assert!(idx.table_bytes() <= 40 * 10_000);
    }
}
