//! Packs: many sealed blobs of one type in one immutable object.
//!
//! Layout (FORMAT.md, "Packs"):
//! `blob_0 ‖ blob_1 ‖ … ‖ sealed_header ‖ header_len u32 LE`
//! where `sealed_header` is the metadata-key sealed box (associated data
//! `custos/v1/pack-header`) of `count u32 LE` followed by `count` entries of
//! `type u8 ‖ id [32] ‖ length u32 LE ‖ raw_length u32 LE` (41 bytes); blob
//! offsets are the running sum of lengths from 0. A group (format 3) is a
//! `G` entry whose last field is its member count, followed by that many `M`
//! entries (`M ‖ id ‖ offset in the group's plaintext ‖ length`) that take no
//! bytes of the pack. The object is named `<prefix>/<hh>/<hex>` where hex is
//! the BLAKE3 of the whole pack.

use crate::blob::{BlobType, EncodedBlob, GroupRef, GROUP_CODE};
use crate::crypto::{KeyUse, Keys};
use crate::error::{Error, Result};
use crate::id::Id;
use std::sync::{Arc, Mutex};

/// Associated data of a pack header.
pub const PACK_HEADER_AD: &[u8] = b"custos/v1/pack-header";
const ENTRY_LEN: usize = 1 + 32 + 4 + 4;
/// Header type code of a group's member entry.
const MEMBER_CODE: u8 = b'M';

/// One blob's place in a pack. A grouped blob's `offset` and `length` are
/// its group's (the sealed unit to read), `raw_length` its own plaintext
/// length, and `group` says where in the group's plaintext it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub ty: BlobType,
    pub id: Id,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub group: Option<GroupRef>,
}

/// A finished pack, ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub ty: BlobType,
    pub id: Id,
    pub bytes: bytes::Bytes,
    pub entries: Vec<PackEntry>,
}

impl FinishedPack {
    /// The object name of this pack.
    pub fn object_name(&self) -> String {
        pack_object_name(self.ty, &self.id)
    }
}

/// `<data|tree>/<first two hex digits>/<64 hex digits>`.
pub fn pack_object_name(ty: BlobType, id: &Id) -> String {
    let hex = id.to_hex();
    format!("{}/{}/{}", ty.pack_prefix(), &hex[..2], hex)
}

/// Parse a pack object name back into type and id.
pub fn parse_pack_name(name: &str) -> Option<(BlobType, Id)> {
    let mut parts = name.split('/');
    let ty = match parts.next()? {
        "data" => BlobType::Data,
        "tree" => BlobType::Tree,
        _ => return None,
    };
    let shard = parts.next()?;
    let id = Id::from_hex(parts.next()?)?;
    if parts.next().is_some() || !id.to_hex().starts_with(shard) {
        return None;
    }
    Some((ty, id))
}

/// The page size a pack is aligned to in its buffer.
const PAGE: usize = 4096;

/// Pack buffers handed back when the last reference to a finished pack is
/// dropped (after its upload), for the next pack to fill.
///
/// Why: a pack buffer is at least malloc's mmap threshold (16 MiB, set in
/// `main.rs`), so without reuse every pack is a fresh mapping whose pages
/// all fault in again as blobs are copied in: most of the ~170 000 page
/// faults and ~0.2 CPU-s of system time in a 1 GiB first backup
/// (bench/README.md).
#[derive(Debug, Clone, Default)]
pub struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    /// Idle buffers kept at most. Each one kept is 16 MiB resident: one
    /// saved ~70 % of the faults at +15–20 MiB peak RSS, two saved ~75 % at
    /// +30 MiB, which left the 1 GiB first backup at restic's peak RSS.
    pub const MAX_IDLE: usize = 1;

    /// An empty buffer with at least `capacity`, reused when one is idle.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.0.lock().expect("buffer pool lock").pop();
        let mut buf = reused.unwrap_or_default();
        buf.reserve(capacity);
        buf
    }

    /// `buf[start..]` as shared bytes that come back to this pool when dropped.
    fn freeze(&self, buf: Vec<u8>, start: usize) -> bytes::Bytes {
        bytes::Bytes::from_owner(Pooled {
            buf,
            start,
            pool: self.clone(),
        })
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut idle = self.0.lock().expect("buffer pool lock");
        if idle.len() < Self::MAX_IDLE {
            idle.push(buf);
        }
    }

    /// Idle buffers held now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.0.lock().expect("buffer pool lock").len()
    }
}

/// A finished pack's buffer on its way back to its pool.
struct Pooled {
    buf: Vec<u8>,
    /// Where the pack starts in `buf` (see [`Packer`]'s `start`).
    start: usize,
    pool: BufPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// Accumulates sealed blobs of one type until the pack reaches its target size.
#[derive(Debug)]
pub struct Packer {
    ty: BlobType,
    target_size: usize,
    buf: Vec<u8>,
    /// Where the pack starts in `buf`: the first page boundary, so a local
    /// target writes the pack straight from it with `O_DIRECT`
    /// (`target::localfile`) instead of copying it to an aligned buffer.
    start: usize,
    entries: Vec<PackEntry>,
    pool: BufPool,
}

impl Packer {
    /// A new, empty packer with a pool of its own.
    pub fn new(ty: BlobType, target_size: usize) -> Self {
        Self::with_pool(ty, target_size, BufPool::default())
    }

    /// A new, empty packer that takes its buffers from `pool`.
    pub fn with_pool(ty: BlobType, target_size: usize, pool: BufPool) -> Self {
        Packer {
            ty,
            target_size,
            buf: Vec::new(),
            start: 0,
            entries: Vec::new(),
            pool,
        }
    }

    /// True when no blob was added since the last finish.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Add a blob; returns a finished pack when the target size is reached.
    pub fn add(&mut self, keys: &Keys, blob: EncodedBlob) -> Option<FinishedPack> {
        debug_assert_eq!(blob.ty, self.ty);
        if self.buf.capacity() == 0 {
            self.buf = self
                .pool
                .take(self.target_size.max(blob.sealed.len()) + 2 * PAGE);
            self.start = self.buf.as_ptr().align_offset(PAGE).min(PAGE);
            self.buf.resize(self.start, 0);
        }
        let offset = (self.buf.len() - self.start) as u32;
        let length = blob.sealed.len() as u32;
        if blob.members.is_empty() {
            self.entries.push(PackEntry {
                ty: blob.ty,
                id: blob.id,
                offset,
                length,
                raw_length: blob.raw_len,
                group: None,
            });
        } else {
            self.entries.extend(blob.members.iter().map(|m| PackEntry {
                ty: blob.ty,
                id: m.id,
                offset,
                length,
                raw_length: m.len,
                group: Some(GroupRef {
                    id: blob.id,
                    inner: m.inner,
                }),
            }));
        }
        self.buf.extend_from_slice(&blob.sealed);
        if self.buf.len() - self.start >= self.target_size {
            self.finish(keys)
        } else {
            None
        }
    }

    /// Seal the header and return the pack (None when empty).
    pub fn finish(&mut self, keys: &Keys) -> Option<FinishedPack> {
        if self.entries.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut self.entries);
        let mut bytes = std::mem::take(&mut self.buf);
        let header = encode_header(&entries);
        let sealed = keys.seal(KeyUse::Metadata, PACK_HEADER_AD, &header);
        bytes.extend_from_slice(&sealed);
        bytes.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = Id::of_object(&bytes[self.start..]);
        Some(FinishedPack {
            ty: self.ty,
            id,
            bytes: self.pool.freeze(bytes, self.start),
            entries,
        })
    }
}

fn encode_header(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&[0; 4]);
    let mut push = |code: u8, id: &Id, a: u32, b: u32| {
        out.push(code);
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
    };
    let mut count = 0u32;
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        let Some(g) = e.group else {
            push(e.ty.code(), &e.id, e.length, e.raw_length);
            count += 1;
            i += 1;
            continue;
        };
        // A group's members are consecutive entries with its id and offset.
        let n = entries[i..]
            .iter()
            .take_while(|m| m.group.is_some_and(|h| h.id == g.id) && m.offset == e.offset)
            .count();
        push(GROUP_CODE, &g.id, e.length, n as u32);
        for m in &entries[i..i + n] {
            let inner = m.group.expect("member").inner;
            push(MEMBER_CODE, &m.id, inner, m.raw_length);
        }
        count += 1 + n as u32;
        i += n;
    }
    out[..4].copy_from_slice(&count.to_le_bytes());
    out
}

/// Read and authenticate the header of a whole pack held in memory.
pub fn read_header(keys: &Keys, name: &str, pack: &[u8]) -> Result<Vec<PackEntry>> {
    let at = header_range(name, pack.len() as u64, pack)?;
    open_header(
        keys,
        name,
        at.start,
        &pack[at.start as usize..at.end as usize],
    )
}

/// The plaintext of one header entry, from its whole pack's bytes: a blob
/// decoded, or a grouped blob cut from its opened group and checked against
/// its id. For walks over packs rather than the index (tests, audits); data
/// keys must be loaded first.
pub fn decode_entry(keys: &Keys, e: &PackEntry, pack: &[u8]) -> Result<Vec<u8>> {
    let sealed = pack
        .get(e.offset as usize..e.offset as usize + e.length as usize)
        .ok_or_else(|| Error::corrupt(format!("blob {}", e.id), "lies beyond its pack"))?;
    match e.group {
        None => crate::blob::decode(keys, e.ty, &e.id, sealed),
        Some(g) => {
            let group = crate::blob::decode_group(keys, &g.id, sealed)?;
            Ok(crate::blob::member(keys, &e.id, &group, g.inner, e.raw_length)?.to_vec())
        }
    }
}

/// Bytes read from the end of a pack to find its header without reading the
/// pack: enough for the header of ~1 500 blobs, and a second read fetches a
/// larger one.
pub const HEADER_PROBE: u64 = 64 << 10;

/// Where the sealed header of a pack of `pack_len` bytes lies, from `tail`,
/// the pack's last bytes (at least its 4-byte trailer).
pub fn header_range(name: &str, pack_len: u64, tail: &[u8]) -> Result<std::ops::Range<u64>> {
    let bad = |reason: &str| Error::corrupt(name, reason.to_string());
    if pack_len < 4 || tail.len() < 4 || tail.len() as u64 > pack_len {
        return Err(bad("shorter than its trailer"));
    }
    let trailer = &tail[tail.len() - 4..];
    let hlen = u64::from(u32::from_le_bytes(trailer.try_into().expect("4 bytes")));
    if hlen > pack_len - 4 {
        return Err(bad("header length beyond pack size"));
    }
    Ok(pack_len - 4 - hlen..pack_len - 4)
}

/// Authenticate and parse a sealed pack header; `body_len`: the bytes before
/// it, which its blob lengths must add up to.
pub fn open_header(
    keys: &Keys,
    name: &str,
    body_len: u64,
    sealed: &[u8],
) -> Result<Vec<PackEntry>> {
    let header = keys
        .open(KeyUse::Metadata, PACK_HEADER_AD, sealed)
        .ok_or_else(|| Error::corrupt(name, "header authentication failed"))?;
    parse_header(name, body_len, &header)
}

/// Parse an opened pack header; `body_len`: the bytes before it, which its
/// blob (and group) lengths must add up to.
pub fn parse_header(name: &str, body_len: u64, header: &[u8]) -> Result<Vec<PackEntry>> {
    let bad = |reason: &str| Error::corrupt(name, reason.to_string());
    if header.len() < 4 {
        return Err(bad("header too short"));
    }
    let count = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if header.len() != 4 + count * ENTRY_LEN {
        return Err(bad("header entry count does not match its length"));
    }
    let mut entries = Vec::with_capacity(count);
    let mut offset: u64 = 0;
    let field =
        |raw: &[u8], at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let mut raws = header[4..].chunks_exact(ENTRY_LEN);
    while let Some(raw) = raws.next() {
        let id = Id(raw[1..33].try_into().expect("32 bytes"));
        let (length, b) = (field(raw, 33), field(raw, 37));
        if offset + u64::from(length) > u64::from(u32::MAX) {
            return Err(bad("blob offset beyond 4 GiB"));
        }
        if length == 0 {
            // A sealed blob is never empty (it holds at least its tag); units
            // at one offset would be taken for one group by readers.
            return Err(bad("a blob of zero bytes in header"));
        }
        if raw[0] == GROUP_CODE {
            if b == 0 {
                return Err(bad("empty group in header"));
            }
            let mut inner: u64 = 0;
            for _ in 0..b {
                let m = raws
                    .next()
                    .ok_or_else(|| bad("group members missing from header"))?;
                if m[0] != MEMBER_CODE || u64::from(field(m, 33)) != inner {
                    return Err(bad("group member entries out of order in header"));
                }
                let len = field(m, 37);
                entries.push(PackEntry {
                    ty: BlobType::Data,
                    id: Id(m[1..33].try_into().expect("32 bytes")),
                    offset: offset as u32,
                    length,
                    raw_length: len,
                    group: Some(GroupRef {
                        id,
                        inner: inner as u32,
                    }),
                });
                inner += u64::from(len);
                if inner > u64::from(u32::MAX) {
                    return Err(bad("group plaintext beyond 4 GiB"));
                }
            }
        } else {
            let ty =
                BlobType::from_code(raw[0]).ok_or_else(|| bad("unknown blob type in header"))?;
            entries.push(PackEntry {
                ty,
                id,
                offset: offset as u32,
                length,
                raw_length: b,
                group: None,
            });
        }
        offset += u64::from(length);
    }
    if offset != body_len {
        return Err(bad("blob lengths in header do not add up to the pack size"));
    }
    Ok(entries)
}

/// A blob's place in its pack: (offset, length).
pub trait Placed {
    fn place(&self) -> (u32, u32);
}

impl Placed for PackEntry {
    fn place(&self) -> (u32, u32) {
        (self.offset, self.length)
    }
}

/// Two needed regions of a pack closer than this are read as one range.
pub const COALESCE_GAP: u64 = 1 << 20;
/// Largest single ranged read.
pub const MAX_RANGE: u64 = 64 << 20;

/// Group blobs of one pack, given in offset order, into the ranges to read:
/// a blob joins the range before it when it starts within [`COALESCE_GAP`]
/// of that range's end and the range stays within [`MAX_RANGE`].
pub fn coalesce<T: Placed>(
    blobs: impl IntoIterator<Item = T>,
) -> Vec<(std::ops::Range<u64>, Vec<T>)> {
    let mut ranges: Vec<(std::ops::Range<u64>, Vec<T>)> = Vec::new();
    for b in blobs {
        let (offset, length) = b.place();
        let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(length));
        match ranges.last_mut() {
            Some((r, group)) if start <= r.end + COALESCE_GAP && end - r.start <= MAX_RANGE => {
                r.end = r.end.max(end);
                group.push(b);
            }
            _ => ranges.push((start..end, vec![b])),
        }
    }
    ranges
}

/// Cuts the sealed blobs of a streamed range out of its chunks, in offset
/// order. A blob inside one chunk is a slice of it; only a blob that
/// straddles chunks is copied together.
pub struct Cutter {
    /// Pack offset of the first byte of `partial`, or of the next chunk
    /// when `partial` is empty.
    next: u64,
    /// The first part of a blob that straddles chunks.
    partial: bytes::BytesMut,
}

impl Cutter {
    pub fn new(start: u64) -> Cutter {
        Cutter {
            next: start,
            partial: bytes::BytesMut::new(),
        }
    }

    /// Take in the next chunk; every want it completes moves to `out`.
    /// Returns the sealed bytes moved.
    pub fn push<W: Placed>(
        &mut self,
        mut chunk: bytes::Bytes,
        wants: &mut std::iter::Peekable<std::vec::IntoIter<W>>,
        out: &mut Vec<(W, bytes::Bytes)>,
    ) -> usize {
        use bytes::Buf;
        let mut cut = 0;
        while let Some(w) = wants.peek() {
            let (off, len) = w.place();
            let (off, len) = (u64::from(off), len as usize);
            if self.partial.is_empty() {
                // The chunk starts at `next`: skip to the blob, if it is here.
                let skip = off.saturating_sub(self.next);
                if skip >= chunk.len() as u64 {
                    self.next += chunk.len() as u64;
                    return cut;
                }
                chunk.advance(skip as usize);
                self.next = off;
                if chunk.len() < len {
                    self.partial.reserve(len);
                    self.partial.extend_from_slice(&chunk);
                    return cut;
                }
                let sealed = chunk.split_to(len);
                out.push((wants.next().expect("peeked"), sealed));
            } else {
                // `partial` is the start of this blob.
                let need = len - self.partial.len();
                if chunk.len() < need {
                    self.partial.extend_from_slice(&chunk);
                    return cut;
                }
                self.partial.extend_from_slice(&chunk.split_to(need));
                let sealed = self.partial.split().freeze();
                out.push((wants.next().expect("peeked"), sealed));
            }
            self.next = off + len as u64;
            cut += len;
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{decode, encode, EncodeSettings};
    use crate::crypto::MasterKey;

    #[test]
    fn pack_round_trip_and_name_parsing() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let mut packer = Packer::new(BlobType::Data, 1 << 20);
        let datas: Vec<Vec<u8>> = (0..10).map(|i| vec![i as u8; 1000 + i]).collect();
        for d in &datas {
            let id = keys.blob_id(d);
            let s = EncodeSettings {
                zstd_level: 3,
                padding: true,
            };
            assert!(packer
                .add(&keys, encode(&keys, s, BlobType::Data, id, d).unwrap())
                .is_none());
        }
        let pack = packer.finish(&keys).unwrap();
        assert!(packer.is_empty());
        let name = pack.object_name();
        assert_eq!(parse_pack_name(&name), Some((BlobType::Data, pack.id)));
        assert_eq!(Id::of_object(&pack.bytes), pack.id);
        let entries = read_header(&keys, &name, &pack.bytes).unwrap();
        assert_eq!(entries, pack.entries);
        for (e, d) in entries.iter().zip(&datas) {
            let s = &pack.bytes[e.offset as usize..(e.offset + e.length) as usize];
            assert_eq!(&decode(&keys, e.ty, &e.id, s).unwrap(), d);
        }
        let mut bad = pack.bytes.to_vec();
        let n = bad.len();
        bad[n - 10] ^= 0x40;
        assert!(read_header(&keys, &name, &bad).is_err());
        assert!(parse_pack_name("data/zz/abc").is_none());
    }

    /// A group's members come back from the header flattened, each with
    /// the group's place and its own offset in the group; the group opens
    /// and every member hashes to its id.
    #[test]
    fn groups_round_trip_through_the_header() {
        use crate::blob::{decode_group, encode_group, member, Member};
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let s = EncodeSettings {
            zstd_level: 3,
            padding: true,
        };
        let mut packer = Packer::new(BlobType::Data, 1 << 20);
        let single = vec![7u8; 5000];
        let enc = encode(&keys, s, BlobType::Data, keys.blob_id(&single), &single).unwrap();
        packer.add(&keys, enc);
        let (mut plain, mut members) = (Vec::new(), Vec::new());
        for i in 0..5u32 {
            let d = format!("message {i} ").repeat(i as usize + 3).into_bytes();
            members.push(Member {
                id: keys.blob_id(&d),
                inner: plain.len() as u32,
                len: d.len() as u32,
            });
            plain.extend_from_slice(&d);
        }
        let group = encode_group(&keys, s, members.clone(), &plain).unwrap();
        let gid = group.id;
        packer.add(&keys, group);
        let pack = packer.finish(&keys).unwrap();
        let entries = read_header(&keys, "p", &pack.bytes).unwrap();
        assert_eq!(entries, pack.entries);
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[0].group, None);
        for (e, m) in entries[1..].iter().zip(&members) {
            assert_eq!((e.id, e.raw_length), (m.id, m.len));
            assert_eq!(
                e.group,
                Some(GroupRef {
                    id: gid,
                    inner: m.inner
                })
            );
            assert_eq!((e.offset, e.length), (entries[1].offset, entries[1].length));
            let sealed = &pack.bytes[e.offset as usize..(e.offset + e.length) as usize];
            let opened = decode_group(&keys, &gid, sealed).unwrap();
            assert_eq!(opened, plain);
            assert!(member(&keys, &e.id, &opened, m.inner, m.len).is_ok());
            // A wrong place in the group is refused by the member's id.
            assert!(member(&keys, &e.id, &opened, m.inner + 1, m.len).is_err());
            // A group is not a data blob: the type code is bound.
            assert!(decode(&keys, BlobType::Data, &gid, sealed).is_err());
        }
    }

    /// Header entries of a group that do not describe it exactly are refused.
    #[test]
    fn malformed_group_entries_are_refused() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let id = |b: u8| Id([b; 32]);
        let entry = |code: u8, id: Id, a: u32, b: u32| {
            let mut e = vec![code];
            e.extend_from_slice(&id.0);
            e.extend_from_slice(&a.to_le_bytes());
            e.extend_from_slice(&b.to_le_bytes());
            e
        };
        let header = |entries: &[Vec<u8>]| {
            let mut h = (entries.len() as u32).to_le_bytes().to_vec();
            h.extend(entries.concat());
            keys.seal(KeyUse::Metadata, PACK_HEADER_AD, &h)
        };
        let good = [
            entry(b'G', id(1), 100, 2),
            entry(b'M', id(2), 0, 10),
            entry(b'M', id(3), 10, 5),
        ];
        let entries = open_header(&keys, "p", 100, &header(&good)).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1].group,
            Some(GroupRef {
                id: id(1),
                inner: 10
            })
        );
        let cases: [(&str, Vec<Vec<u8>>); 5] = [
            ("a member outside a group", vec![entry(b'M', id(2), 0, 10)]),
            ("an empty group", vec![entry(b'G', id(1), 100, 0)]),
            ("members missing", good[..2].to_vec()),
            (
                "a gap in the group",
                vec![good[0].clone(), good[1].clone(), entry(b'M', id(3), 11, 5)],
            ),
            (
                "a blob among the members",
                vec![good[0].clone(), good[1].clone(), entry(b'D', id(3), 0, 5)],
            ),
        ];
        for (what, entries) in cases {
            let body = if what == "a member outside a group" {
                0
            } else {
                100
            };
            assert!(
                open_header(&keys, "p", body, &header(&entries)).is_err(),
                "{what}"
            );
        }
    }

    #[test]
    fn nearby_blobs_coalesce_into_ranges_far_ones_do_not() {
        struct B(u32, u32);
        impl Placed for B {
            fn place(&self) -> (u32, u32) {
                (self.0, self.1)
            }
        }
        let gap = COALESCE_GAP as u32;
        let ranges = coalesce([B(0, 100), B(100 + gap, 50), B(100 + 2 * gap + 200, 10)]);
        let spans: Vec<_> = ranges.iter().map(|(r, g)| (r.clone(), g.len())).collect();
        assert_eq!(
            spans,
            vec![
                (0..u64::from(150 + gap), 2),
                (
                    u64::from(100 + 2 * gap + 200)..u64::from(100 + 2 * gap + 210),
                    1
                )
            ]
        );
        // No range grows past MAX_RANGE, however close its blobs lie.
        let step = (MAX_RANGE / 4) as u32;
        let ranges = coalesce((0..8).map(|i| B(i * step, step)));
        assert!(ranges.len() >= 2);
        assert!(ranges.iter().all(|(r, _)| r.end - r.start <= MAX_RANGE));
        assert_eq!(ranges.iter().map(|(_, g)| g.len()).sum::<usize>(), 8);
    }

    #[test]
    fn pack_buffers_come_back_to_the_pool_and_are_reused() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let pool = BufPool::default();
        let mut packer = Packer::with_pool(BlobType::Data, 4096, pool.clone());
        let blob = |n: u8| {
            let d = vec![n; 5000];
            let s = EncodeSettings {
                zstd_level: 0,
                padding: false,
            };
            encode(&keys, s, BlobType::Data, keys.blob_id(&d), &d).unwrap()
        };
        let first = packer
            .add(&keys, blob(1))
            .expect("over the target: finished");
        let first_ptr = first.bytes.as_ptr();
        // Page-aligned, so a local target writes it without a copy.
        assert_eq!(first_ptr.align_offset(PAGE), 0);
        let copy = first.bytes.clone();
        drop(first);
        assert_eq!(pool.idle(), 0, "a clone still holds the buffer");
        drop(copy);
        assert_eq!(pool.idle(), 1);
        let second = packer.add(&keys, blob(2)).expect("finished");
        assert_eq!(pool.idle(), 0);
        assert_eq!(
            second.bytes.as_ptr(),
            first_ptr,
            "the same allocation again"
        );
        assert_eq!(Id::of_object(&second.bytes), second.id);
        assert_eq!(second.bytes.as_ptr().align_offset(PAGE), 0);
        let entries = read_header(&keys, "second", &second.bytes).unwrap();
        assert_eq!(entries.len(), 1);
        let e = entries[0];
        let s = &second.bytes[e.offset as usize..(e.offset + e.length) as usize];
        assert_eq!(decode(&keys, e.ty, &e.id, s).unwrap(), vec![2; 5000]);
    }
}
