//! The index: which pack holds each blob, at which offset.
//!
//! Index objects (`index/<id>`) are written by each backup after its packs
//! and before its snapshot; readers load and merge all of them. In memory the
//! merged index is a table sorted by blob id, 32 bytes per blob; blobs that
//! share a group (format 3) point at one shared group slot.

use serde::{Deserialize, Serialize};

use crate::blob::{BlobType, GroupRef};
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
    /// Offset of the sealed blob (of its group, when grouped) in the pack.
    pub offset: u32,
    /// Length of the sealed blob (of its group, when grouped) in the pack.
    pub length: u32,
    /// Length of the blob's own plaintext.
    pub raw_length: u32,
    /// Format 3: the group the blob is sealed in, and where in the group's
    /// plaintext it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRef>,
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
                    group: e.group,
                })
                .collect(),
        }
    }

    /// Each blob's share of the stored bytes, in `blobs` order: a single
    /// blob's sealed length; a group's sealed length split over its members
    /// by plaintext length (the shares of one group add up to its length).
    pub fn stored_shares(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.blobs.len());
        let mut i = 0;
        while i < self.blobs.len() {
            let b = &self.blobs[i];
            let Some(g) = b.group else {
                out.push(u64::from(b.length));
                i += 1;
                continue;
            };
            let run = self.blobs[i..]
                .iter()
                .take_while(|m| m.group.is_some_and(|h| h.id == g.id) && m.offset == b.offset)
                .count();
            let members = &self.blobs[i..i + run];
            let raw: u64 = members.iter().map(|m| u64::from(m.raw_length)).sum();
            let length = u64::from(b.length);
            let mut given = 0;
            for (k, m) in members.iter().enumerate() {
                let share = if k + 1 == run {
                    length - given
                } else {
                    (length * u64::from(m.raw_length))
                        .checked_div(raw)
                        .unwrap_or(length / run as u64)
                };
                given += share;
                out.push(share);
            }
            i += run;
        }
        out
    }

    /// The pack's object name.
    pub fn object_name(&self) -> String {
        pack_object_name(self.ty, &self.id)
    }
}

/// Where a blob lives. For a grouped blob, `offset` and `length` are its
/// group's sealed bytes in the pack (what to read) and `group` where the
/// blob lies in the group's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub ty: BlobType,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub group: Option<GroupRef>,
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
///
/// A grouped blob's `pack` is [`GROUPED`] plus the number of its group's
/// slot, and its `offset` is its place in the group's plaintext.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u128,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// Flag in [`Entry::pack`]: the rest is a [`GroupSlot`] number.
const GROUPED: u32 = 1 << 31;

/// A group's place, shared by its members' entries (44 bytes per group of
/// typically dozens of blobs).
#[derive(Debug, Clone, Copy)]
struct GroupSlot {
    id: Id,
    pack: u32,
    offset: u32,
    length: u32,
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
    groups: Vec<GroupSlot>,
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
            for b in &p.blobs {
                let (pack, offset) = match b.group {
                    None => (pos, b.offset),
                    Some(g) => (GROUPED | self.group_slot(pos, b, &g.id), g.inner),
                };
                self.entries.push(Entry {
                    key: key_of(&b.id),
                    pack,
                    offset,
                    length: b.length,
                    raw_length: b.raw_length,
                });
            }
        }
    }

    /// The slot of the group `b` is in (members are listed together, so
    /// only the last slot can be theirs).
    fn group_slot(&mut self, pack: u32, b: &IndexBlob, id: &Id) -> u32 {
        let same = |s: &GroupSlot| s.pack == pack && s.offset == b.offset && s.id == *id;
        if !self.groups.last().is_some_and(same) {
            self.groups.push(GroupSlot {
                id: *id,
                pack,
                offset: b.offset,
                length: b.length,
            });
        }
        (self.groups.len() - 1) as u32
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
        let groups = self.groups;
        let pack_of = |e: &Entry| pack_position(&groups, e.pack);
        // stable: among equally preferred copies the first added stays first
        entries.sort_by_key(|e| (e.key, doomed[pack_of(e)]));
        entries.dedup_by_key(|e| e.key);
        entries.shrink_to_fit();
        let mut groups = groups;
        groups.shrink_to_fit();
        Index {
            packs: self.packs,
            entries,
            groups,
        }
    }
}

/// Position in the pack list of an entry's `pack` field.
fn pack_position(groups: &[GroupSlot], pack: u32) -> usize {
    if pack & GROUPED == 0 {
        pack as usize
    } else {
        groups[(pack & !GROUPED) as usize].pack as usize
    }
}

/// Merged in-memory index: a sorted table searched by binary search.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<(Id, BlobType, u64)>,
    entries: Vec<Entry>,
    groups: Vec<GroupSlot>,
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
        if e.pack & GROUPED != 0 {
            let g = &self.groups[(e.pack & !GROUPED) as usize];
            let (pack, ty, _) = self.packs[g.pack as usize];
            return Some(BlobLocation {
                pack,
                ty,
                offset: g.offset,
                length: g.length,
                raw_length: e.raw_length,
                group: Some(GroupRef {
                    id: g.id,
                    inner: e.offset,
                }),
            });
        }
        let (pack, ty, _) = self.packs[e.pack as usize];
        Some(BlobLocation {
            pack,
            ty,
            offset: e.offset,
            length: e.length,
            raw_length: e.raw_length,
            group: None,
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

    /// Size of a pack (a linear search: for rare paths).
    pub fn pack_size(&self, id: &Id) -> Option<u64> {
        self.packs.iter().find(|(p, _, _)| p == id).map(|p| p.2)
    }

    /// All packs: (id, type, size).
    pub fn packs(&self) -> &[(Id, BlobType, u64)] {
        &self.packs
    }

    /// Bytes of memory held by the blob table (for the ≤ 40 B/blob budget).
    pub fn table_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// Bytes of memory the index holds: the blob table, the group slots and
    /// the pack list.
    pub fn memory_bytes(&self) -> usize {
        self.table_bytes()
            + self.groups.capacity() * std::mem::size_of::<GroupSlot>()
            + self.packs.capacity() * std::mem::size_of::<(Id, BlobType, u64)>()
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
                group: None,
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

    /// Grouped blobs locate their group; members of one group share a slot,
    /// and their shares of the stored bytes add up to the group's length.
    #[test]
    fn grouped_blobs_locate_their_group() {
        let g = Id::of_object(b"group");
        let blob = |n: u32, offset: u32, length: u32, raw: u32, inner: Option<u32>| IndexBlob {
            id: Id::of_object(&n.to_le_bytes()),
            offset,
            length,
            raw_length: raw,
            group: inner.map(|inner| GroupRef { id: g, inner }),
        };
        let p = IndexPack {
            id: Id::of_object(b"pack"),
            ty: BlobType::Data,
            size: 1000,
            blobs: vec![
                blob(1, 0, 300, 400, None),
                blob(2, 300, 101, 30, Some(0)),
                blob(3, 300, 101, 60, Some(30)),
                blob(4, 300, 101, 10, Some(90)),
                blob(5, 401, 50, 40, None),
            ],
        };
        assert_eq!(p.stored_shares(), vec![300, 30, 60, 11, 50]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json.matches("\"group\"").count(), 3, "{json}");
        let back: IndexPack = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        let idx = Index::from_files([&IndexFile {
            packs: vec![p.clone()],
        }]);
        assert_eq!(idx.groups.len(), 1);
        let loc = idx.get(&p.blobs[2].id).unwrap();
        assert_eq!(
            (loc.pack, loc.offset, loc.length, loc.raw_length),
            (p.id, 300, 101, 60)
        );
        assert_eq!(loc.group, Some(GroupRef { id: g, inner: 30 }));
        assert_eq!(idx.get(&p.blobs[4].id).unwrap().group, None);
        assert_eq!(idx.totals(), (5, 540));
        // Avoiding the pack still finds the only copy.
        let mut b = IndexBuilder::default();
        b.add_file(&IndexFile {
            packs: vec![p.clone()],
        });
        let avoid = [p.id].into_iter().collect();
        assert_eq!(
            b.build_avoiding(&avoid).get(&p.blobs[3].id).unwrap().group,
            Some(GroupRef { id: g, inner: 90 })
        );
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
                            group: None,
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
