//! `check`: verify the repository on one target.
//!
//! Structure (always): every index object opens; every pack an index names
//! exists with the indexed size; every snapshot opens; every tree reachable
//! from a snapshot opens and every blob it references is indexed.
//! Data (`--read-data`, or a random subset of packs): every pack's bytes hash
//! to its name, its header authenticates and matches the index, and every
//! blob in it decrypts and hashes to its id. Each problem names the object.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use rand::seq::SliceRandom;

use crate::blob::{self, BlobType};
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{header_range, open_header, parse_pack_name, Cutter, PackEntry, HEADER_PROBE};
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::target::TargetRef;
use crate::tree::NodeKind;

/// How much pack data to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// Structure only.
    None,
    /// Every pack.
    All,
    /// A random share of packs, in percent (0 < p ≤ 100).
    Subset(f64),
}

/// Result of checking one target.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub target: String,
    pub snapshots: usize,
    pub index_objects: usize,
    pub packs: usize,
    pub blobs: usize,
    pub packs_read: usize,
    /// Problems: the repository is damaged.
    pub errors: Vec<String>,
    /// Oddities that do not lose data (unreferenced packs …).
    pub warnings: Vec<String>,
}

/// Pack-reading counters a progress display polls (totals set once the packs
/// to read are chosen).
#[derive(Debug, Default)]
pub struct CheckProgress {
    pub packs_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub packs_read: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Check the repository on `repo`'s single target.
pub async fn check(repo: &Repository, read: ReadData) -> Result<CheckReport> {
    check_with_progress(repo, read, None).await
}

/// [`check`], counting packs read into `progress`.
pub async fn check_with_progress(
    repo: &Repository,
    read: ReadData,
    progress: Option<Arc<CheckProgress>>,
) -> Result<CheckReport> {
    if !matches!(read, ReadData::None) {
        repo.require(crate::crypto::Role::Restore, "check --read-data")?;
    }
    let target = repo.primary()?.clone();
    let mut report = CheckReport {
        target: target.name().to_string(),
        ..Default::default()
    };

    // Snapshots are listed before the index objects: a backup running meanwhile
    // writes its index object before its snapshot, so every snapshot seen here
    // has its index object in the listing below.
    let snapshot_ids = repo.list_ids(ObjectKind::Snapshot).await?;

    // Index objects, one by one so each failure is named.
    let mut index = crate::index::IndexBuilder::default();
    let mut indexed: HashMap<Id, IndexPack> = HashMap::new();
    for id in repo.list_ids(ObjectKind::Index).await? {
        report.index_objects += 1;
        match repo.load_object::<IndexFile>(ObjectKind::Index, &id).await {
            Ok(file) => {
                index.add_file(&file);
                for p in file.packs {
                    indexed.entry(p.id).or_insert(p);
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    let index = index.build();
    report.blobs = index.blob_count();

    // Packs present vs. packs indexed.
    let mut present: HashMap<Id, (String, u64)> = HashMap::new();
    for prefix in ["data/", "tree/"] {
        for m in target.list(prefix).await? {
            match parse_pack_name(&m.name) {
                Some((_, id)) => {
                    present.insert(id, (m.name, m.size));
                }
                None => report
                    .warnings
                    .push(format!("unexpected object {} (not a pack name)", m.name)),
            }
        }
    }
    report.packs = present.len();
    for (id, p) in &indexed {
        match present.get(id) {
            None => report
                .errors
                .push(format!("pack {} is indexed but missing", p.object_name())),
            Some((_, size)) if *size != p.size => report.errors.push(format!(
                "pack {} has {size} bytes, the index says {}",
                p.object_name(),
                p.size
            )),
            _ => {}
        }
    }
    for (id, (name, _)) in &present {
        if !indexed.contains_key(id) {
            report.warnings.push(format!(
                "pack {name} is not indexed (left by an interrupted backup; harmless, prune removes it)"
            ));
        }
    }

    check_data_keys(repo, &target, &mut report).await?;

    // Snapshots and the trees they reach, each tree pack read once
    // (target/memo.rs) instead of one ranged read per tree.
    let walk = repo.with_targets(vec![crate::target::memo::Memo::wrap(
        target.clone(),
        TREE_MEMO_BUDGET,
    )]);
    let index = Arc::new(index);
    let mut seen_trees: HashSet<Id> = HashSet::new();
    let mut seen_parts: HashSet<Id> = HashSet::new();
    for id in snapshot_ids {
        report.snapshots += 1;
        match walk
            .load_object::<Snapshot>(ObjectKind::Snapshot, &id)
            .await
        {
            Ok(s) => {
                check_tree(
                    &walk,
                    &index,
                    &id,
                    s.tree,
                    String::new(),
                    &mut seen_trees,
                    &mut report.errors,
                )
                .await;
                check_cursors(&walk, &index, &id, &s, &mut seen_trees, &mut report.errors).await;
                check_customer_index(&walk, &id, &s, &mut seen_parts, &mut report.errors).await;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    // The held tree packs are not needed for reading pack data.
    drop(walk);

    // Pack data.
    let mut to_read: Vec<&IndexPack> = indexed
        .values()
        .filter(|p| present.contains_key(&p.id))
        .collect();
    to_read.sort_by_key(|p| p.id);
    match read {
        ReadData::None => to_read.clear(),
        ReadData::All => {}
        ReadData::Subset(pct) => {
            let n = ((to_read.len() as f64) * pct / 100.0).ceil() as usize;
            to_read.shuffle(&mut rand::thread_rng());
            to_read.truncate(n.min(to_read.len()));
        }
    }
    report.packs_read = to_read.len();
    if let Some(p) = &progress {
        p.packs_total.store(to_read.len() as u64, Ordering::Relaxed);
        p.bytes_total
            .store(to_read.iter().map(|p| p.size).sum(), Ordering::Relaxed);
    }
    let keys = repo.keys_arc();
    let results: Vec<Vec<String>> = futures::stream::iter(to_read)
        .map(|p| {
            let (target, keys, p) = (target.clone(), keys.clone(), p.clone());
            let progress = progress.clone();
            async move {
                let size = p.size;
                let done = move || {
                    if let Some(pr) = &progress {
                        pr.packs_read.fetch_add(1, Ordering::Relaxed);
                        pr.bytes_read.fetch_add(size, Ordering::Relaxed);
                    }
                };
                let _counted = Finally(Some(done));
                read_and_verify(repo, &target, &keys, &p).await
            }
        })
        .buffer_unordered(crate::target::pack_read_concurrency(target.as_ref()))
        .collect()
        .await;
    report.errors.extend(results.into_iter().flatten());
    Ok(report)
}

/// Bytes of tree packs held in memory during the tree walk.
const TREE_MEMO_BUDGET: u64 = 64 << 20;

/// Runs its closure when dropped (counts a pack however its check ended).
struct Finally<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Finally<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A snapshot's cursors stored in blobs: every blob indexed and readable,
/// and together one JSON cursor (a backup key can check this too).
async fn check_cursors(
    repo: &Repository,
    index: &Index,
    snap: &Id,
    s: &Snapshot,
    seen: &mut HashSet<Id>,
    errors: &mut Vec<String>,
) {
    for (coll, c) in &s.cursors {
        if c.cursor_blobs.is_empty() {
            continue;
        }
        let missing: Vec<String> = c
            .cursor_blobs
            .iter()
            .filter(|b| !index.contains(b))
            .map(|b| b.to_hex())
            .collect();
        if !missing.is_empty() {
            errors.push(format!(
                "snapshot {} collection {coll}: cursor blob(s) {} not in any index",
                snap.short(),
                missing.join(", ")
            ));
            continue;
        }
        // Shared blobs were read with an earlier snapshot's cursor.
        if c.cursor_blobs.iter().all(|b| seen.contains(b)) {
            continue;
        }
        match repo.load_cursor(index, c).await {
            Ok(_) => seen.extend(c.cursor_blobs.iter().copied()),
            Err(e) => errors.push(format!(
                "snapshot {} collection {coll}: cursor: {e}",
                snap.short()
            )),
        }
    }
}

fn check_tree<'a>(
    repo: &'a Repository,
    index: &'a Arc<Index>,
    snap: &'a Id,
    tree: Id,
    path: String,
    seen: &'a mut HashSet<Id>,
    errors: &'a mut Vec<String>,
) -> futures::future::BoxFuture<'a, ()> {
    Box::pin(async move {
        if !seen.insert(tree) {
            return;
        }
        let shown = if path.is_empty() {
            "/".to_string()
        } else {
            path.clone()
        };
        let nodes = match repo.load_tree(index, &tree).await {
            Ok(n) => n,
            Err(e) => {
                errors.push(format!(
                    "snapshot {} path {shown}: tree {tree}: {e}",
                    snap.short()
                ));
                return;
            }
        };
        for n in nodes {
            let child = format!("{path}/{}", n.name);
            for id in &n.content {
                if !index.contains(id) {
                    errors.push(format!(
                        "snapshot {} path {child}: data blob {id} is not in any index",
                        snap.short()
                    ));
                }
            }
            if n.kind == NodeKind::Dir {
                if let Some(sub) = n.subtree {
                    check_tree(repo, index, snap, sub, child, seen, errors).await;
                }
            }
        }
    })
}

/// Every `datakeys/` object (format 2) is well formed and, for keys that can
/// read content, unwraps; a damaged one would make content unreadable, so it
/// is an error even without `--read-data`.
async fn check_data_keys(
    repo: &Repository,
    target: &crate::target::TargetRef,
    report: &mut CheckReport,
) -> Result<()> {
    if !repo.keys().wraps_data_keys() {
        return Ok(());
    }
    for m in target.list("datakeys/").await? {
        let Some(id) = crate::crypto::parse_data_key_object(&m.name) else {
            report.warnings.push(format!(
                "unexpected object {} (not a data key name)",
                m.name
            ));
            continue;
        };
        if !repo.role().reads_content() {
            if m.size != crate::crypto::WRAPPED_DATA_KEY_LEN as u64 {
                report.errors.push(format!(
                    "object {} is damaged: {} bytes, a wrapped data key has {}",
                    m.name,
                    m.size,
                    crate::crypto::WRAPPED_DATA_KEY_LEN
                ));
            }
            continue;
        }
        match target.get(&m.name).await {
            Ok(bytes) => {
                if let Err(reason) = repo.keys().load_data_key(&id, &bytes) {
                    report
                        .errors
                        .push(Error::corrupt(&m.name, reason).to_string());
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    Ok(())
}

/// Unwrap the data keys that sealed `blobs` (complete sealed blobs of a data
/// pack) when the repository wraps them (format 2), from this check's
/// targets: a missing or damaged `datakeys/` object is an error.
async fn load_data_keys<'a>(
    repo: &Repository,
    ty: BlobType,
    blobs: impl IntoIterator<Item = &'a [u8]>,
) -> Result<()> {
    if ty != BlobType::Data || !repo.keys().wraps_data_keys() {
        return Ok(());
    }
    repo.ensure_data_keys(blobs).await
}

/// Bytes per ranged read of a local pack, and gathered from a download
/// stream between verification steps: with one partial blob, about what
/// check holds per pack being read (a whole 16 MiB pack before).
const PIECE: usize = 2 << 20;

/// Read one pack in pieces and verify it against its index entry: its header
/// (read first, from the end), then its bytes in order, each blob decoded as
/// soon as it has arrived. Returns the problems found.
async fn read_and_verify(
    repo: &Repository,
    target: &TargetRef,
    keys: &Arc<Keys>,
    p: &IndexPack,
) -> Vec<String> {
    let name = p.object_name();
    let entries = match fetch_header(keys, target, &name, p.size).await {
        Ok(e) => e,
        Err(e) => return vec![e.to_string()],
    };
    let mut errors = index_vs_header(&name, p, &entries);
    let mut v = PackVerifier::new(name.clone(), p.ty, entries);
    // Local files are read a piece at a time (the store's stream reads them
    // whole); a remote pack is one download consumed as it arrives.
    let mut stream = if target.location().starts_with('/') {
        None
    } else {
        match target.get_range_stream(&name, 0..p.size).await {
            Ok(s) => Some(s),
            Err(e) => {
                errors.push(e.to_string());
                return errors;
            }
        }
    };
    let (mut at, mut fresh) = (0u64, 0usize);
    loop {
        let piece = match &mut stream {
            Some(s) => s.next().await,
            None if at < p.size => {
                let end = (at + PIECE as u64).min(p.size);
                let r = target.get_range(&name, at..end).await;
                at = end;
                Some(r)
            }
            None => None,
        };
        let done = match piece {
            Some(Ok(b)) => {
                fresh += b.len();
                v.push(b);
                false
            }
            Some(Err(e)) => {
                errors.push(e.to_string());
                return errors;
            }
            None => true,
        };
        if !done && fresh < PIECE {
            continue;
        }
        fresh = 0;
        if let Err(e) = load_data_keys(repo, p.ty, v.ready()).await {
            errors.push(format!("pack {name}: {e}"));
            return errors;
        }
        let k = keys.clone();
        v = match tokio::task::spawn_blocking(move || {
            v.step(&k);
            v
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("pack {name}: verifier panicked: {e}"));
                return errors;
            }
        };
        if done {
            break;
        }
    }
    errors.extend(v.finish(p.id, p.size));
    errors
}

/// A pack's header read from its end: the last [`HEADER_PROBE`] bytes, and
/// the rest of the header when it is larger.
pub(crate) async fn fetch_header(
    keys: &Keys,
    target: &TargetRef,
    name: &str,
    size: u64,
) -> Result<Vec<PackEntry>> {
    let from = size - size.min(HEADER_PROBE);
    let tail = target.get_range(name, from..size).await?;
    let at = header_range(name, size, &tail)?;
    let sealed = if at.start >= from {
        tail.slice((at.start - from) as usize..(at.end - from) as usize)
    } else {
        target.get_range(name, at.clone()).await?
    };
    open_header(keys, name, at.start, &sealed)
}

/// Index entries of a pack that its header does not list.
fn index_vs_header(name: &str, p: &IndexPack, entries: &[PackEntry]) -> Vec<String> {
    let header: HashSet<_> = entries
        .iter()
        .map(|e| (e.id, e.offset, e.length, e.group))
        .collect();
    p.blobs
        .iter()
        .filter(|b| !header.contains(&(b.id, b.offset, b.length, b.group)))
        .map(|b| {
            format!(
                "pack {name}: blob {} is indexed but not in the pack header",
                b.id
            )
        })
        .collect()
}

/// A sealed unit of a pack: one blob, or a group with its members.
struct Unit {
    /// The blob, or the group's first member (whose offset and length are
    /// the group's).
    first: PackEntry,
    /// A group's members, in plaintext order; empty for a single blob.
    members: Vec<PackEntry>,
}

impl crate::pack::Placed for Unit {
    fn place(&self) -> (u32, u32) {
        (self.first.offset, self.first.length)
    }
}

/// Header entries (members flattened) as the sealed units they describe.
fn units(entries: Vec<PackEntry>) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    for e in entries {
        match (out.last_mut(), e.group) {
            (Some(u), Some(g))
                if u.first.offset == e.offset && u.first.group.is_some_and(|h| h.id == g.id) =>
            {
                u.members.push(e)
            }
            (_, Some(_)) => out.push(Unit {
                first: e,
                members: vec![e],
            }),
            (_, None) => out.push(Unit {
                first: e,
                members: Vec::new(),
            }),
        }
    }
    out
}

/// Verifies a pack read in order, piece by piece: every byte is hashed for
/// the pack name, and each blob (or group) in the header is cut out of the
/// pieces ([`Cutter`]: a slice of its piece, copied only when it straddles
/// two) and checked against its id once all its bytes have arrived; each
/// member of a group is checked against its own id.
struct PackVerifier {
    name: String,
    ty: BlobType,
    entries: std::iter::Peekable<std::vec::IntoIter<Unit>>,
    cutter: Cutter,
    hasher: blake3::Hasher,
    /// Pieces received and not hashed yet.
    unhashed: Vec<Bytes>,
    /// Complete units not verified yet.
    cut: Vec<(Unit, Bytes)>,
    read: u64,
    errors: Vec<String>,
}

impl PackVerifier {
    fn new(name: String, ty: BlobType, entries: Vec<PackEntry>) -> Self {
        PackVerifier {
            name,
            ty,
            entries: units(entries).into_iter().peekable(),
            cutter: Cutter::new(0),
            hasher: blake3::Hasher::new(),
            unhashed: Vec::new(),
            cut: Vec::new(),
            read: 0,
            errors: Vec::new(),
        }
    }

    /// The next bytes of the pack.
    fn push(&mut self, piece: Bytes) {
        self.read += piece.len() as u64;
        self.unhashed.push(piece.clone());
        self.cutter.push(piece, &mut self.entries, &mut self.cut);
    }

    /// The complete blobs held and not verified yet.
    fn ready(&self) -> impl Iterator<Item = &[u8]> {
        self.cut.iter().map(|(_, b)| &b[..])
    }

    /// Hash what arrived and verify every blob now complete (CPU-bound: run
    /// it on a blocking thread).
    fn step(&mut self, keys: &Keys) {
        for piece in self.unhashed.drain(..) {
            self.hasher.update(&piece);
        }
        for (u, sealed) in std::mem::take(&mut self.cut) {
            let e = u.first;
            if e.ty != self.ty {
                self.errors.push(format!(
                    "pack {}: blob {} has type {:?} in a {:?} pack",
                    self.name, e.id, e.ty, self.ty
                ));
            } else if u.members.is_empty() {
                if let Err(err) = blob::decode(keys, e.ty, &e.id, &sealed) {
                    self.errors.push(format!("pack {}: {err}", self.name));
                }
            } else {
                self.verify_group(keys, &u.members, &sealed);
            }
        }
    }

    /// A group opens, its members tile its plaintext, and each hashes to its id.
    fn verify_group(&mut self, keys: &Keys, members: &[PackEntry], sealed: &[u8]) {
        let gid = members[0].group.expect("a member").id;
        let plain = match blob::decode_group(keys, &gid, sealed) {
            Ok(p) => p,
            Err(err) => {
                self.errors.push(format!(
                    "pack {}: {err} (holding {} blobs, first {})",
                    self.name,
                    members.len(),
                    members[0].id
                ));
                return;
            }
        };
        let list: Vec<blob::Member> = members
            .iter()
            .map(|m| blob::Member {
                id: m.id,
                inner: m.group.expect("a member").inner,
                len: m.raw_length,
            })
            .collect();
        if !blob::members_tile(&list, plain.len()) {
            self.errors.push(format!(
                "pack {}: group {gid}: its members do not cover its {} bytes exactly",
                self.name,
                plain.len()
            ));
        }
        for m in &list {
            if let Err(err) = blob::member(keys, &m.id, &plain, m.inner, m.len) {
                self.errors
                    .push(format!("pack {}: group {gid}: {err}", self.name));
            }
        }
    }

    /// The problems found, once the whole pack was stepped through: `size`
    /// bytes hashing to `id`.
    fn finish(mut self, id: Id, size: u64) -> Vec<String> {
        if self.read != size {
            self.errors.push(
                Error::corrupt(
                    &self.name,
                    format!("{} bytes read, the index says {size}", self.read),
                )
                .to_string(),
            );
        } else if Id(*self.hasher.finalize().as_bytes()) != id {
            self.errors.insert(
                0,
                Error::corrupt(&self.name, "bytes do not hash to the pack name").to_string(),
            );
        }
        if let Some(u) = self.entries.peek() {
            self.errors.push(format!(
                "pack {}: blob {} was not read (the pack ended before it)",
                self.name, u.first.id
            ));
        }
        self.errors
    }
}

/// A record snapshot's customer index: the document and every part it names
/// are readable and describe the partitions they claim.
async fn check_customer_index(
    repo: &Repository,
    snap_id: &Id,
    snap: &Snapshot,
    seen: &mut HashSet<Id>,
    errors: &mut Vec<String>,
) {
    use crate::customer::CustomerObject;
    let Some(doc) = snap.customer_index else {
        return;
    };
    let parts = match repo
        .load_object::<CustomerObject>(ObjectKind::Customer, &doc)
        .await
    {
        Ok(CustomerObject::Index { parts }) => parts,
        Ok(CustomerObject::Part(_)) => {
            errors.push(format!(
                "snapshot {}: its customer index {} is a part, not an index",
                snap_id.short(),
                doc.short()
            ));
            return;
        }
        Err(e) => {
            errors.push(format!("snapshot {}: customer index: {e}", snap_id.short()));
            return;
        }
    };
    for p in parts {
        if !seen.insert(p.part) {
            continue;
        }
        match repo
            .load_object::<CustomerObject>(ObjectKind::Customer, &p.part)
            .await
        {
            Ok(CustomerObject::Part(d)) if d.tree == p.tree => {}
            Ok(_) => errors.push(format!(
                "snapshot {}: customer index part {} does not describe partition {}/{}",
                snap_id.short(),
                p.part.short(),
                p.collection,
                p.partition
            )),
            Err(e) => errors.push(format!(
                "snapshot {}: customer index part for {}/{}: {e}",
                snap_id.short(),
                p.collection,
                p.partition
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{encode, EncodeSettings};
    use crate::crypto::MasterKey;
    use crate::pack::{read_header, Packer};

    /// A data pack of blobs of assorted sizes (compressible and not) and,
    /// last, a group of five blobs: its bytes and header entries.
    fn pack(keys: &Keys) -> (Id, Vec<u8>, Vec<PackEntry>) {
        let mut packer = Packer::new(BlobType::Data, 64 << 20);
        let s = EncodeSettings {
            zstd_level: 3,
            padding: true,
        };
        for i in 0..12u32 {
            let n = [10, 1000, 70_000, 300_000][i as usize % 4] + i as usize;
            let d: Vec<u8> = if i % 2 == 0 {
                {
                    use rand::{RngCore, SeedableRng};
                    let mut d = vec![0u8; n];
                    rand::rngs::StdRng::seed_from_u64(u64::from(i)).fill_bytes(&mut d);
                    d
                }
            } else {
                format!("record {i} ").repeat(n / 10 + 1).into_bytes()
            };
            let id = keys.blob_id(&d);
            assert!(packer
                .add(keys, encode(keys, s, BlobType::Data, id, &d).unwrap())
                .is_none());
        }
        let (mut plain, mut members) = (Vec::new(), Vec::new());
        for i in 0..5u32 {
            let d = format!("grouped message {i} ").repeat(50 * i as usize + 1);
            members.push(crate::blob::Member {
                id: keys.blob_id(d.as_bytes()),
                inner: plain.len() as u32,
                len: d.len() as u32,
            });
            plain.extend_from_slice(d.as_bytes());
        }
        let group = crate::blob::encode_group(keys, s, members, &plain).unwrap();
        assert!(packer.add(keys, group).is_none());
        let p = packer.finish(keys).unwrap();
        let name = p.object_name();
        let entries = read_header(keys, &name, &p.bytes).unwrap();
        (p.id, p.bytes.to_vec(), entries)
    }

    /// Verify `bytes` fed in pieces of `piece` bytes, as a pack of `size`.
    fn verify_in_pieces(
        keys: &Keys,
        (id, size): (Id, u64),
        bytes: &[u8],
        entries: &[PackEntry],
        piece: usize,
    ) -> Vec<String> {
        let mut v = PackVerifier::new("data/xx/pack".into(), BlobType::Data, entries.to_vec());
        for (i, c) in bytes.chunks(piece).enumerate() {
            v.push(Bytes::copy_from_slice(c));
            // Step after some pieces only, as the reader does.
            if i % 3 == 0 {
                v.step(keys);
            }
        }
        v.step(keys);
        v.finish(id, size)
    }

    #[test]
    fn a_pack_read_in_any_pieces_verifies_clean() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let (id, bytes, entries) = pack(&keys);
        for piece in [1, 7, 4096, 65_537, PIECE, bytes.len()] {
            let errs = verify_in_pieces(&keys, (id, bytes.len() as u64), &bytes, &entries, piece);
            assert!(errs.is_empty(), "pieces of {piece}: {errs:?}");
        }
    }

    #[test]
    fn damage_is_named_by_blob_and_pack() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let (id, bytes, entries) = pack(&keys);
        // A flipped byte inside the fourth blob: that blob, and the pack hash.
        let e = &entries[3];
        let mut bad = bytes.clone();
        bad[(e.offset + e.length / 2) as usize] ^= 1;
        let errs = verify_in_pieces(&keys, (id, bad.len() as u64), &bad, &entries, 4096);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("do not hash to the pack name"), "{errs:?}");
        assert!(errs[1].contains(&e.id.to_string()), "{errs:?}");
        for other in entries.iter().filter(|o| o.id != e.id) {
            assert!(
                !errs.iter().any(|m| m.contains(&other.id.to_string())),
                "{errs:?}"
            );
        }
        // A pack cut short: the missing length and the blobs never read.
        let cut = (entries[8].offset + 5) as usize;
        let errs = verify_in_pieces(&keys, (id, bytes.len() as u64), &bytes[..cut], &entries, 7);
        assert!(
            errs.iter()
                .any(|m| m.contains(&format!("{cut} bytes read"))),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|m| m.contains(&entries[8].id.to_string()) && m.contains("not read")),
            "{errs:?}"
        );
        // A data blob listed in a tree pack: named with both types (once
        // per sealed unit: 12 blobs and a group).
        let mut v = PackVerifier::new("tree/xx/pack".into(), BlobType::Tree, entries.clone());
        v.push(Bytes::copy_from_slice(&bytes));
        v.step(&keys);
        let errs = v.finish(id, bytes.len() as u64);
        assert_eq!(errs.len(), 13, "{errs:?}");
        assert!(errs[0].contains("has type Data in a Tree pack"), "{errs:?}");
    }

    #[test]
    fn damage_in_a_group_names_the_group_and_a_wrong_member_names_the_member() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let (id, bytes, entries) = pack(&keys);
        let members: Vec<&PackEntry> = entries.iter().filter(|e| e.group.is_some()).collect();
        assert_eq!(members.len(), 5);
        let gid = members[0].group.unwrap().id;
        let (off, len) = (members[0].offset, members[0].length);
        let mut bad = bytes.clone();
        bad[(off + len / 2) as usize] ^= 1;
        let errs = verify_in_pieces(&keys, (id, bad.len() as u64), &bad, &entries, 4096);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[1].contains(&format!("group {gid}")), "{errs:?}");
        assert!(errs[1].contains(&members[0].id.to_string()), "{errs:?}");
        // A header whose member entry points at the wrong bytes (a writer
        // bug): that member is named, its group is not taken for damaged.
        let mut wrong = entries.clone();
        let n = wrong.len();
        wrong[n - 2].id = Id([9; 32]);
        let errs = verify_in_pieces(&keys, (id, bytes.len() as u64), &bytes, &wrong, 4096);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains(&Id([9; 32]).to_string()), "{errs:?}");
        assert!(errs[0].contains("does not hash to its id"), "{errs:?}");
        // Members that do not cover the group's plaintext exactly.
        let mut short = entries.clone();
        short.pop();
        let errs = verify_in_pieces(&keys, (id, bytes.len() as u64), &bytes, &short, 4096);
        assert!(errs.iter().any(|m| m.contains("do not cover")), "{errs:?}");
    }

    #[test]
    fn the_header_is_found_from_the_tail_alone() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let (_, bytes, entries) = pack(&keys);
        let size = bytes.len() as u64;
        let tail = &bytes[bytes.len() - 100..];
        let at = header_range("p", size, tail).unwrap();
        assert_eq!(at.end, size - 4);
        let got = open_header(
            &keys,
            "p",
            at.start,
            &bytes[at.start as usize..at.end as usize],
        )
        .unwrap();
        assert_eq!(got, entries);
        assert!(header_range("p", 3, &bytes[..3]).is_err());
        let mut lie = bytes.clone();
        let n = lie.len();
        lie[n - 4..].copy_from_slice(&(u32::MAX).to_le_bytes());
        let err = header_range("p", size, &lie[n - 8..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("header length beyond pack size"), "{err}");
        // Blob lengths must add up to what precedes the header.
        let err = open_header(
            &keys,
            "p",
            at.start + 1,
            &bytes[at.start as usize..at.end as usize],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("do not add up"), "{err}");
    }
}
