//! Backup of record sources (connectors) into snapshots.
//!
//! A snapshot of a record source is the full logical state of that source.
//! Tree layout: `/<collection>/<YYYY-MM>/<record id>.<ext>` (partition by the
//! record's creation month, UTC; `undated` when unknown), so a day of new
//! messages rewrites one partition leaf, its collection list and the root.
//! Record metadata (ids, kind, times, participants, customer ids,
//! jurisdiction, source metadata as `m.*`) lives in the tree node, so listing
//! and filtering never download bodies; the original payload is the node's
//! content, restored byte for byte.
//!
//! Incremental runs start from the parent snapshot of the same source: its
//! tree is the previous state and its cursors say where each collection's sync
//! ended. Only changes are fetched; untouched collections and partitions keep
//! their tree blobs. The new cursors are committed inside the new snapshot,
//! so an interrupted run is simply repeated from the old cursors: nothing is
//! lost, nothing duplicated.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use custos_connectors::{
    Change, ChangeSink, Collection, Connector, ConnectorError, Payload, Record,
};

use crate::backup::BackupReport;
use crate::customer::{PartInput, Suppressed};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::pipeline::{Progress, ReadError, Saver, Session};
use crate::repo::Repository;
use crate::snapshot::{CollectionCursor, Snapshot, SnapshotEntry, Summary};
use crate::spill::{Region, Spill};
use crate::tree::{Node, NodeKind, RawNode};

/// What happens to records deleted at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Records deleted at the source disappear from the next snapshot.
    Mirror,
    /// They stay, marked `deleted` with the time the deletion was seen.
    #[default]
    Archive,
}

/// How to run one record source.
#[derive(Debug, Clone)]
pub struct RecordBackupOptions {
    /// Source name (snapshots are grouped by it).
    pub source: String,
    /// Source type (`imap`, `mbox` …), recorded in the snapshot.
    pub source_type: String,
    pub mode: Mode,
    pub tags: Vec<String>,
    pub hostname: String,
    pub time_zone: String,
    /// List a collection in full (cursor dropped) when its last full listing
    /// is older than this; `None`: only when the connector asks for it.
    pub reconcile_every: Option<chrono::Duration>,
    /// Ignore the parent snapshot's cursors (full listing of everything).
    pub full: bool,
    /// Also index email addresses mentioned in record bodies as customers
    /// (`mentioned_ids`; off by default: a mention is not a party).
    pub index_mentions: bool,
    /// Jurisdiction given to records whose connector gives none (the
    /// source's `jurisdiction` key).
    pub jurisdiction: Option<String>,
    /// Bytes of record nodes one collection's working state keeps in memory;
    /// above it the coldest partitions are parked in a sealed scratch file
    /// ([`crate::spill`]) until half of it is held ([`STATE_MEMORY`]).
    pub state_memory: usize,
}

/// The default [`RecordBackupOptions::state_memory`]: 64 MiB, ~80 000
/// small messages.
pub const STATE_MEMORY: usize = 64 << 20;

/// Metadata keys written on record nodes.
pub mod keys {
    pub const RECORD_ID: &str = "record_id";
    pub const KIND: &str = "kind";
    pub const CREATED: &str = "created";
    pub const UPDATED: &str = "updated";
    pub const PARTICIPANTS: &str = "participants";
    pub const CUSTOMER_IDS: &str = "customer_ids";
    pub const JURISDICTION: &str = "jurisdiction";
    pub const SUBJECT: &str = "subject";
    pub const DELETED: &str = "deleted";
    pub const DELETED_SEEN: &str = "deleted_seen";
    pub const PAYLOAD_EXT: &str = "payload_ext";
    pub const ATTACHMENTS: &str = "attachments";
    pub const COLLECTION: &str = "collection";
    /// Email addresses mentioned in the body (`index_mentions`), typed like `customer_ids`.
    pub const MENTIONED_IDS: &str = "mentioned_ids";
    /// Prefix of connector-specific metadata.
    pub const SOURCE_META: &str = "m.";
}

/// Collection node metadata: number of records in the collection.
const RECORDS_KEY: &str = "records";

/// Partition (tree folder) of a record: its creation month in UTC.
pub fn partition_of(created: Option<DateTime<Utc>>) -> String {
    created
        .map(|t| t.format("%Y-%m").to_string())
        .unwrap_or_else(|| "undated".into())
}

#[derive(Default)]
struct Counts {
    new: u64,
    changed: u64,
    deleted: u64,
}

/// The working state of one collection: partitions of record nodes.
struct CollectionState {
    /// (partition name, its unchanged subtree from the parent or its loaded
    /// nodes by record id), indexed by `where_is` values
    partitions: Vec<(String, Partition)>,
    /// partition name → position in `partitions`
    by_name: HashMap<String, u32>,
    /// record id → partition position (a u32, not the name: ~50 bytes less
    /// per record held)
    where_is: HashMap<String, u32>,
    /// Estimated bytes of the nodes held in loaded partitions.
    held: usize,
    /// Ticks on every touch of a partition: the coldest are parked first.
    clock: u64,
    /// Where cold partitions are parked ([`CollectionState::shrink`]).
    spill: Spill,
    /// [`RecordBackupOptions::state_memory`].
    budget: usize,
    /// Partitions parked so far (for the progress counters).
    parked: u64,
}

/// Estimated memory of one held record node: its serialized bytes, its id
/// (twice: the partition map and `where_is`) and map overheads.
fn held_size(id: &str, h: &Held) -> usize {
    let node = match h {
        Held::Raw(r) => r.json.len() + r.name.len(),
        // Decoded nodes are rare (metadata updates, archive deletes).
        Held::Node(_) => 2048,
    };
    node + 2 * id.len() + 128
}

struct Partition {
    /// The parent's tree blob while unmodified.
    subtree: Option<Id>,
    /// The record nodes, once `loaded` (a parent's partition is read only
    /// when a change touches it: an incremental run of a large collection
    /// holds the record ids, not every node).
    nodes: BTreeMap<String, Held>,
    loaded: bool,
    dirty: bool,
    /// Its nodes, parked while cold (not `loaded`; `dirty` as it was).
    parked: Option<Region>,
    /// Estimated bytes of `nodes` ([`held_size`]).
    bytes: usize,
    /// [`CollectionState::clock`] at its last touch.
    touched: u64,
}

impl Partition {
    fn new(subtree: Option<Id>, loaded: bool) -> Partition {
        Partition {
            subtree,
            nodes: BTreeMap::new(),
            loaded,
            dirty: subtree.is_none(),
            parked: None,
            bytes: 0,
            touched: 0,
        }
    }
}

/// A record node in the working state: serialized (its leaf JSON, about a
/// third of the memory of a [`Node`] with its metadata map) until a change
/// needs it as a node.
enum Held {
    Raw(RawNode),
    Node(Box<Node>),
}

impl Held {
    fn node(&self) -> Result<std::borrow::Cow<'_, Node>> {
        match self {
            Held::Node(n) => Ok(std::borrow::Cow::Borrowed(n)),
            Held::Raw(r) => serde_json::from_slice(&r.json)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| Error::Failed(format!("record node in memory: {e}"))),
        }
    }

    fn node_mut(&mut self) -> Result<&mut Node> {
        if let Held::Raw(_) = self {
            let n = self.node()?.into_owned();
            *self = Held::Node(Box::new(n));
        }
        match self {
            Held::Node(n) => Ok(n),
            Held::Raw(_) => unreachable!("just decoded"),
        }
    }

    fn into_raw(self) -> RawNode {
        match self {
            Held::Raw(r) => r,
            Held::Node(n) => RawNode::of(&n),
        }
    }
}

impl CollectionState {
    fn empty(budget: usize) -> Self {
        CollectionState {
            partitions: Vec::new(),
            by_name: HashMap::new(),
            where_is: HashMap::new(),
            held: 0,
            clock: 0,
            spill: Spill::new(),
            budget,
            parked: 0,
        }
    }

    /// The record ids of every partition of a parent collection tree; the
    /// nodes themselves are loaded on first touch ([`Sink::load_slot`]).
    async fn load(repo: &Repository, index: &Index, tree: Id, budget: usize) -> Result<Self> {
        let mut st = Self::empty(budget);
        for part in repo.load_tree(index, &tree).await? {
            let Some(sub) = part.subtree.filter(|_| part.kind == NodeKind::Dir) else {
                continue;
            };
            let slot = st.slot(&part.name);
            let where_is = &mut st.where_is;
            repo.for_each_tree_node(index, &sub, |n| {
                where_is.insert(record_id_of(&n), slot);
            })
            .await?;
            st.partitions[slot as usize].1 = Partition::new(Some(sub), false);
        }
        Ok(st)
    }

    /// Position of a partition, created (empty, dirty) when new.
    fn slot(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        let i = self.partitions.len() as u32;
        self.partitions
            .push((name.to_string(), Partition::new(None, true)));
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn get_mut(&mut self, id: &str) -> Result<Option<&mut Node>> {
        let Some(p) = self.where_is.get(id) else {
            return Ok(None);
        };
        self.clock += 1;
        let Some((_, part)) = self.partitions.get_mut(*p as usize) else {
            return Ok(None);
        };
        debug_assert!(part.loaded, "partition touched before it was loaded");
        part.dirty = true;
        part.touched = self.clock;
        let Some(held) = part.nodes.get_mut(id) else {
            return Ok(None);
        };
        let before = held_size(id, held);
        held.node_mut()?; // decoded in place: its size estimate changes
        let after = held_size(id, held);
        part.bytes = (part.bytes + after).saturating_sub(before);
        self.held = (self.held + after).saturating_sub(before);
        held.node_mut().map(Some)
    }

    fn get(&self, id: &str) -> Result<Option<std::borrow::Cow<'_, Node>>> {
        let held = self
            .where_is
            .get(id)
            .and_then(|p| self.partitions.get(*p as usize)?.1.nodes.get(id));
        held.map(Held::node).transpose()
    }

    fn remove(&mut self, id: &str) -> Option<Held> {
        let p = self.where_is.remove(id)?;
        self.clock += 1;
        let (_, part) = self.partitions.get_mut(p as usize)?;
        debug_assert!(part.loaded, "partition touched before it was loaded");
        part.dirty = true;
        part.touched = self.clock;
        let held = part.nodes.remove(id)?;
        let size = held_size(id, &held);
        part.bytes = part.bytes.saturating_sub(size);
        self.held = self.held.saturating_sub(size);
        Some(held)
    }

    fn insert(&mut self, id: String, partition: String, node: Held) {
        self.remove(&id);
        let slot = self.slot(&partition);
        self.where_is.insert(id.clone(), slot);
        self.clock += 1;
        let size = held_size(&id, &node);
        let part = &mut self.partitions[slot as usize].1;
        debug_assert!(part.loaded, "partition touched before it was loaded");
        part.dirty = true;
        part.touched = self.clock;
        part.bytes += size;
        part.nodes.insert(id, node);
        self.held += size;
    }

    /// Install the nodes of a partition read back (from the parent's tree
    /// or the spill).
    fn fill(&mut self, slot: u32, nodes: BTreeMap<String, Held>) {
        self.clock += 1;
        let bytes = nodes.iter().map(|(id, h)| held_size(id, h)).sum();
        let part = &mut self.partitions[slot as usize].1;
        part.nodes = nodes;
        part.loaded = true;
        part.parked = None;
        part.bytes = bytes;
        part.touched = self.clock;
        self.held += bytes;
    }

    /// Over its budget, let go of the coldest loaded partitions (never
    /// `keep`, the one being worked on) until half of it is held: an
    /// unchanged partition of the parent is simply dropped (its tree is in
    /// the repository), a changed one is parked in the spill file.
    fn shrink(&mut self, keep: Option<u32>) -> Result<()> {
        if self.held <= self.budget {
            return Ok(());
        }
        let mut cold: Vec<(u64, u32)> = (self.partitions.iter().enumerate())
            .filter(|(i, (_, p))| p.loaded && !p.nodes.is_empty() && keep != Some(*i as u32))
            .map(|(i, (_, p))| (p.touched, i as u32))
            .collect();
        cold.sort_unstable();
        for (_, slot) in cold {
            if self.held <= self.budget / 2 {
                break;
            }
            self.park(slot)?;
        }
        Ok(())
    }

    /// Take a loaded partition's nodes out of memory.
    fn park(&mut self, slot: u32) -> Result<()> {
        let (name, part) = &mut self.partitions[slot as usize];
        let nodes = std::mem::take(&mut part.nodes);
        if part.dirty || part.subtree.is_none() {
            let mut buf = Vec::new();
            for (id, held) in nodes {
                let raw = held.into_raw();
                crate::spill::push_field(&mut buf, id.as_bytes());
                crate::spill::push_field(&mut buf, &raw.name);
                crate::spill::push_field(&mut buf, &raw.json);
            }
            let region = self
                .spill
                .put(&buf)
                .map_err(|e| Error::Failed(format!("parking record partition {name}: {e}")))?;
            part.parked = Some(region);
            self.parked += 1;
        }
        part.loaded = false;
        self.held = self.held.saturating_sub(part.bytes);
        part.bytes = 0;
        Ok(())
    }

    /// The nodes of a parked partition.
    fn unpark(&self, slot: u32) -> Result<Option<BTreeMap<String, Held>>> {
        let (name, part) = &self.partitions[slot as usize];
        let Some(region) = part.parked else {
            return Ok(None);
        };
        let bad = |e: String| Error::Failed(format!("record partition {name} read back: {e}"));
        let buf = self.spill.get(region).map_err(|e| bad(e.to_string()))?;
        let fields = crate::spill::fields(&buf).ok_or_else(|| bad("cut short".into()))?;
        if fields.len() % 3 != 0 {
            return Err(bad("cut short".into()));
        }
        let mut nodes = BTreeMap::new();
        for f in fields.chunks_exact(3) {
            let id = String::from_utf8(f[0].to_vec()).map_err(|e| bad(e.to_string()))?;
            let raw = RawNode {
                name: f[1].to_vec(),
                json: f[2].into(),
            };
            nodes.insert(id, Held::Raw(raw));
        }
        Ok(Some(nodes))
    }

    fn ids(&self) -> Vec<String> {
        self.where_is.keys().cloned().collect()
    }

    fn len(&self) -> usize {
        self.where_is.len()
    }

    /// Write dirty partitions and the collection list; returns the collection
    /// tree and its partitions for the customer index (with the part records
    /// of the partitions written now).
    fn write(mut self, saver: &Saver, collection: &str) -> Result<(Id, Vec<PartInput>)> {
        use rayon::prelude::*;
        let mut parts = Vec::new();
        let mut inputs = Vec::new();
        let mut order: Vec<u32> = (0..self.partitions.len() as u32).collect();
        order.sort_by(|a, b| {
            self.partitions[*a as usize]
                .0
                .cmp(&self.partitions[*b as usize].0)
        });
        for slot in order {
            // Parked partitions come back one at a time.
            if let Some(nodes) = self.unpark(slot)? {
                self.fill(slot, nodes);
            }
            let (name, p) = std::mem::replace(
                &mut self.partitions[slot as usize],
                (String::new(), Partition::new(None, true)),
            );
            if p.loaded && p.nodes.is_empty() {
                continue;
            }
            if p.dirty && !p.loaded {
                // Writing only the nodes held would drop the parent's records.
                return Err(Error::Failed(format!(
                    "collection {collection}: partition {name} changed before its records were loaded (a bug)"
                )));
            }
            let (sub, records) = match (p.dirty, p.subtree) {
                (false, Some(id)) => (id, None),
                _ => {
                    let mut nodes: Vec<RawNode> =
                        p.nodes.into_values().map(Held::into_raw).collect();
                    let tree = saver.save_tree_raw(&mut nodes)?;
                    // The customer index part, one node decoded at a time.
                    let keys = saver.keys();
                    let records = nodes
                        .par_iter()
                        .map(|r| {
                            serde_json::from_slice::<Node>(&r.json)
                                .map(|n| crate::customer::part_record(keys, &n))
                                .map_err(|e| Error::Failed(format!("record node in memory: {e}")))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (tree, Some(records.into_iter().flatten().collect()))
                }
            };
            let mut n = Node::new(name.as_bytes(), NodeKind::Dir);
            n.subtree = Some(sub);
            parts.push(n);
            inputs.push(PartInput {
                collection: collection.to_string(),
                partition: name,
                tree: sub,
                nodes: None,
                records,
            });
        }
        Ok((saver.save_tree(parts)?, inputs))
    }
}

/// A record node's record id (its name for nodes written before ids were kept).
fn record_id_of(n: &Node) -> String {
    n.meta
        .get(keys::RECORD_ID)
        .cloned()
        .unwrap_or_else(|| n.name.clone())
}

/// Applies a collection's change stream to its state.
struct Sink<'a> {
    saver: Arc<Saver>,
    /// [`RecordBackupOptions::state_memory`].
    budget: usize,
    repo: &'a Repository,
    index: &'a Index,
    parent_tree: Option<Id>,
    state: Option<CollectionState>,
    collection: &'a Collection,
    mode: Mode,
    now: DateTime<Utc>,
    /// Ids sent since the last `Reset` (None: no reset in this run).
    seen: Option<HashSet<String>>,
    counts: Counts,
    warnings: Vec<String>,
    progress: &'a Progress,
    /// Customers erased: their records are dropped at ingest.
    suppressed: &'a Suppressed,
    /// The source name (legal holds may name it).
    source: &'a str,
    index_mentions: bool,
    /// The source's jurisdiction, for records that carry none.
    jurisdiction: Option<&'a str>,
    /// Records dropped because they name a suppressed customer.
    suppressed_count: u64,
    /// Batches of records being stored on blocking threads, applied in
    /// arrival order.
    in_flight: VecDeque<InFlight>,
    /// Payload bytes held by `in_flight` and `pending`.
    in_flight_bytes: usize,
    /// Small records gathered for the next batch (later than `in_flight`).
    pending: Vec<Record>,
    pending_bytes: usize,
}

/// A batch of records whose payloads are being stored while the connector
/// goes on.
struct InFlight {
    bytes: usize,
    nodes: tokio::task::JoinHandle<Result<Vec<Built>>>,
}

/// A stored record: its id, node and the node's serialized form.
type Built = (String, (Node, RawNode));

/// Records per batch, and payload bytes at which a batch is sent early: one
/// blocking task per short message spent ~20 % of an import's CPU waking
/// threads (futex) and handing tasks over.
const BATCH_RECORDS: usize = 32;
const BATCH_BYTES: usize = 1 << 20;

/// Batches stored concurrently per collection (a record's storing — digest,
/// chunking, compression, sealing — runs on a blocking thread while the
/// connector reads and parses the next ones).
///
/// Computed once: `available_parallelism` reads the cgroup files under
/// /proc on Linux (mountinfo included), which cost 12 % of a small-message
/// import when it was asked per record.
fn max_in_flight() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2 + 2)
}

/// Payload bytes held by records in flight, at most (a record over it is
/// stored alone).
const IN_FLIGHT_BYTES: usize = 16 << 20;

impl Sink<'_> {
    async fn state(&mut self) -> Result<&mut CollectionState> {
        if self.state.is_none() {
            let st = match self.parent_tree {
                Some(t) => CollectionState::load(self.repo, self.index, t, self.budget).await?,
                None => CollectionState::empty(self.budget),
            };
            self.state = Some(st);
        }
        Ok(self.state.as_mut().expect("just set"))
    }

    /// Load the nodes of a parent partition not loaded yet.
    async fn load_slot(&mut self, slot: u32) -> Result<()> {
        let (repo, index) = (self.repo, self.index);
        let st = self.state().await?;
        let part = &st.partitions[slot as usize].1;
        if part.loaded {
            return Ok(());
        }
        if let Some(nodes) = st.unpark(slot)? {
            st.fill(slot, nodes);
            return st.shrink(Some(slot));
        }
        let sub = part.subtree.ok_or_else(|| {
            Error::Failed("record partition without nodes or tree (a bug)".into())
        })?;
        let mut nodes = BTreeMap::new();
        repo.for_each_tree_node(index, &sub, |n| {
            nodes.insert(record_id_of(&n), Held::Raw(RawNode::of(&n)));
        })
        .await?;
        let st = self.state().await?;
        st.fill(slot, nodes);
        self.progress
            .partitions_loaded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.state().await?.shrink(Some(slot))
    }

    /// Make sure the partition holding record `id` (if any) is loaded.
    async fn load_for_id(&mut self, id: &str) -> Result<()> {
        match self.state().await?.where_is.get(id).copied() {
            Some(slot) => self.load_slot(slot).await,
            None => Ok(()),
        }
    }

    /// Make sure partition `name` (if it exists) is loaded.
    async fn load_partition(&mut self, name: &str) -> Result<()> {
        match self.state().await?.by_name.get(name).copied() {
            Some(slot) => self.load_slot(slot).await,
            None => Ok(()),
        }
    }

    fn mark_seen(&mut self, id: &str) {
        if let Some(seen) = &mut self.seen {
            seen.insert(id.to_string());
        }
    }

    async fn upsert(&mut self, mut rec: Record) -> Result<()> {
        if rec.jurisdiction.is_none() {
            rec.jurisdiction = self.jurisdiction.map(str::to_string);
        }
        let id = rec.id.clone();
        self.mark_seen(&id);
        if self.suppressed.covers_record(
            self.saver.keys(),
            self.source,
            &self.collection.id,
            rec.kind.as_str(),
            &rec.customer_ids,
        ) {
            // An erased customer: never stored again (a stale copy goes too).
            self.suppressed_count += 1;
            self.drain().await?;
            self.load_for_id(&id).await?;
            self.state().await?.remove(&id);
            return Ok(());
        }
        // Records streamed from the source (a reader) are stored alone, in
        // order: their reader may share the connector's connection or file.
        let bytes = match record_bytes(&rec) {
            Some(b) if b <= IN_FLIGHT_BYTES => b,
            _ => {
                self.drain().await?;
                let (saver, coll, mentions) = (
                    self.saver.clone(),
                    self.collection.id.clone(),
                    self.index_mentions,
                );
                let node = tokio::task::spawn_blocking(move || {
                    build_node(&saver, &coll, rec, mentions).map(with_raw)
                })
                .await
                .map_err(|e| Error::Failed(format!("record task panicked: {e}")))??;
                return self.apply(id, node).await;
            }
        };
        while !self.in_flight.is_empty()
            && (self.in_flight.len() >= max_in_flight()
                || self.in_flight_bytes + bytes > IN_FLIGHT_BYTES)
        {
            self.apply_next().await?;
        }
        self.in_flight_bytes += bytes;
        self.pending_bytes += bytes;
        self.pending.push(rec);
        if self.pending.len() >= BATCH_RECORDS || self.pending_bytes >= BATCH_BYTES {
            self.launch();
        }
        Ok(())
    }

    /// Send the pending records to a blocking thread as one batch.
    fn launch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        let bytes = std::mem::take(&mut self.pending_bytes);
        let (saver, coll, mentions) = (
            self.saver.clone(),
            self.collection.id.clone(),
            self.index_mentions,
        );
        let nodes = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|rec| {
                    let id = rec.id.clone();
                    build_node(&saver, &coll, rec, mentions).map(|n| (id, with_raw(n)))
                })
                .collect()
        });
        self.in_flight.push_back(InFlight { bytes, nodes });
    }

    /// Apply the oldest batch in flight.
    async fn apply_next(&mut self) -> Result<()> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        self.in_flight_bytes -= f.bytes;
        let nodes = f
            .nodes
            .await
            .map_err(|e| Error::Failed(format!("record task panicked: {e}")))??;
        for (id, node) in nodes {
            self.apply(id, node).await?;
        }
        Ok(())
    }

    /// Apply every record in flight and pending (before any other change,
    /// and at the end).
    async fn drain(&mut self) -> Result<()> {
        self.launch();
        while !self.in_flight.is_empty() {
            self.apply_next().await?;
        }
        Ok(())
    }

    /// Wait for the records in flight after a failure, ignoring their results.
    async fn abandon(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        for f in std::mem::take(&mut self.in_flight) {
            let _ = f.nodes.await;
        }
        self.in_flight_bytes = 0;
    }

    /// Put a stored record's node into the collection state.
    async fn apply(&mut self, id: String, (node, raw): (Node, RawNode)) -> Result<()> {
        let partition = node_partition(&node);
        self.load_for_id(&id).await?;
        self.load_partition(&partition).await?;
        let st = self.state().await?;
        match st.get(&id)? {
            Some(old) if old.digest == node.digest && old.meta == node.meta => return Ok(()),
            Some(_) => self.counts.changed += 1,
            None => self.counts.new += 1,
        }
        drop(node);
        let st = self.state().await?;
        st.insert(id, partition.clone(), Held::Raw(raw));
        let slot = st.by_name.get(&partition).copied();
        st.shrink(slot)?;
        self.progress
            .files
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn update_meta(&mut self, id: String, meta: BTreeMap<String, String>) -> Result<()> {
        self.mark_seen(&id);
        self.drain().await?;
        self.load_for_id(&id).await?;
        let st = self.state().await?;
        let Some(node) = st.get_mut(&id)? else {
            self.warnings.push(format!(
                "collection {}: metadata update for unknown record {id} ignored",
                self.collection.id
            ));
            return Ok(());
        };
        // Merge: the keys sent replace those keys; the others stay.
        for (k, v) in meta {
            node.meta.insert(format!("{}{k}", keys::SOURCE_META), v);
        }
        self.counts.changed += 1;
        Ok(())
    }

    async fn delete(&mut self, id: &str) -> Result<()> {
        self.drain().await?;
        self.load_for_id(id).await?;
        let (mode, now) = (self.mode, self.now);
        let st = self.state().await?;
        let counted = match mode {
            Mode::Mirror => st.remove(id).is_some(),
            Mode::Archive => match st.get_mut(id)? {
                Some(node) if !node.meta.contains_key(keys::DELETED) => {
                    node.meta.insert(keys::DELETED.into(), "true".into());
                    node.meta
                        .insert(keys::DELETED_SEEN.into(), now.to_rfc3339());
                    true
                }
                _ => false,
            },
        };
        if counted {
            self.counts.deleted += 1;
        }
        Ok(())
    }

    /// After a `Reset`: everything not re-sent is gone.
    async fn finish_reset(&mut self) -> Result<()> {
        self.drain().await?;
        let Some(seen) = self.seen.take() else {
            return Ok(());
        };
        let gone: Vec<String> = self
            .state()
            .await?
            .ids()
            .into_iter()
            .filter(|id| !seen.contains(id))
            .collect();
        for id in gone {
            self.delete(&id).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ChangeSink for Sink<'_> {
    async fn push(&mut self, change: Change) -> custos_connectors::Result<()> {
        let r = match change {
            Change::Upsert(rec) => self.upsert(rec).await,
            Change::UpdateMeta { id, meta } => self.update_meta(id, meta).await,
            Change::Delete { id } => {
                self.mark_seen(&id);
                // A delete after a reset means "not there": leave it out of `seen`.
                if let Some(seen) = &mut self.seen {
                    seen.remove(&id);
                }
                self.delete(&id).await
            }
            Change::Keep { id } => {
                self.mark_seen(&id);
                Ok(())
            }
            Change::Reset => {
                self.seen = Some(HashSet::new());
                Ok(())
            }
        };
        r.map_err(|e| ConnectorError::Sink(e.to_string()))
    }
}

fn node_partition(node: &Node) -> String {
    let created = node
        .meta
        .get(keys::CREATED)
        .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
        .map(|t| t.with_timezone(&Utc));
    partition_of(created)
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).expect("strings serialize")
}

/// Store a record's payload and attachments; build its tree node.
/// Email addresses in `text` (for `index_mentions`), typed and deduplicated.
pub fn mentioned_emails(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| c.is_whitespace() || "<>()[]{},;:\"'`|".contains(c))
        .map(|t| t.trim_matches(|c: char| c == '.' || c == '!' || c == '?'))
        .filter(|t| {
            t.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty()
                    && d.contains('.')
                    && !d.starts_with('.')
                    && !d.contains('@')
                    && d.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            })
        })
        .map(|t| format!("email:{}", t.to_lowercase()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A node and its serialized form (made on the blocking thread).
fn with_raw(node: Node) -> (Node, RawNode) {
    let raw = RawNode::of(&node);
    (node, raw)
}

/// Payload bytes of a record held in memory; `None` when some content is a
/// reader (streamed from the source).
fn record_bytes(rec: &Record) -> Option<usize> {
    let of = |p: &Payload| match p {
        Payload::Bytes(b) => Some(b.len()),
        Payload::Reader { .. } => None,
    };
    let mut n = of(&rec.payload)?;
    for a in &rec.attachments {
        if let Some(c) = &a.content {
            n += of(c)?;
        }
    }
    Some(n)
}

/// Store a record's payload and attachments; build its tree node. Blocking:
/// runs on a blocking thread.
fn build_node(saver: &Saver, collection: &str, rec: Record, index_mentions: bool) -> Result<Node> {
    let ext = if rec.payload_ext.is_empty() {
        "bin"
    } else {
        &rec.payload_ext
    };
    // Ids that already end in the extension (`0001.eml`) keep their name.
    let name = if rec.id.ends_with(&format!(".{ext}")) {
        rec.id.clone()
    } else {
        format!("{}.{ext}", rec.id)
    };
    let mut node = Node::new(name.as_bytes(), NodeKind::Record);
    let saved = save_payload(saver, rec.payload, &rec.id)?;
    node.content = saved.blobs;
    node.digest = Some(saved.digest);
    node.size = saved.size;
    node.mtime = rec.updated.or(rec.created);
    let m = &mut node.meta;
    m.insert(keys::RECORD_ID.into(), rec.id.clone());
    m.insert(keys::COLLECTION.into(), collection.to_string());
    m.insert(keys::KIND.into(), rec.kind.as_str().to_string());
    m.insert(keys::PAYLOAD_EXT.into(), rec.payload_ext.clone());
    if let Some(t) = rec.created {
        m.insert(keys::CREATED.into(), t.to_rfc3339());
    }
    if let Some(t) = rec.updated {
        m.insert(keys::UPDATED.into(), t.to_rfc3339());
    }
    if !rec.participants.is_empty() {
        m.insert(keys::PARTICIPANTS.into(), json_list(&rec.participants));
    }
    if !rec.customer_ids.is_empty() {
        m.insert(keys::CUSTOMER_IDS.into(), json_list(&rec.customer_ids));
    }
    if index_mentions {
        let mentioned = rec
            .text
            .as_deref()
            .map(mentioned_emails)
            .unwrap_or_default();
        if !mentioned.is_empty() {
            m.insert(keys::MENTIONED_IDS.into(), json_list(&mentioned));
        }
    }
    if let Some(j) = rec.jurisdiction {
        m.insert(keys::JURISDICTION.into(), j);
    }
    if let Some(s) = rec.subject {
        m.insert(keys::SUBJECT.into(), s);
    }
    if rec.deleted {
        m.insert(keys::DELETED.into(), "true".into());
    }
    for (k, v) in rec.meta {
        m.insert(format!("{}{k}", keys::SOURCE_META), v);
    }
    // Contained attachments are described; separate ones are stored as child nodes.
    let mut described = Vec::new();
    let mut children = Vec::new();
    for (i, a) in rec.attachments.into_iter().enumerate() {
        described.push(serde_json::json!({"name": a.name, "media_type": a.media_type, "size": a.size, "stored": a.content.is_some()}));
        if let Some(content) = a.content {
            let saved = save_payload(saver, content, &format!("{} attachment {i}", rec.id))?;
            let file_name = attachment_file_name(i, &a.name);
            let mut n = Node::new(file_name.as_bytes(), NodeKind::Attachment);
            n.content = saved.blobs;
            n.digest = Some(saved.digest);
            n.size = saved.size;
            n.meta.insert("media_type".into(), a.media_type);
            children.push(n);
        }
    }
    if !described.is_empty() {
        node.meta.insert(
            keys::ATTACHMENTS.into(),
            serde_json::Value::Array(described).to_string(),
        );
    }
    if !children.is_empty() {
        node.subtree = Some(saver.save_tree(children)?);
    }
    Ok(node)
}

/// A safe file name for an attachment (`<n>-<name>`, path separators removed).
fn attachment_file_name(i: usize, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c == '\0' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        format!("{i}")
    } else {
        format!("{i}-{clean}")
    }
}

fn save_payload(
    saver: &Saver,
    payload: Payload,
    what: &str,
) -> Result<crate::pipeline::SavedContent> {
    match payload {
        Payload::Bytes(b) => saver.save_bytes(&b),
        Payload::Reader { reader, size } => saver.save_content(reader, size).map_err(|e| match e {
            ReadError::Repo(e) => e,
            ReadError::Source(s) => {
                Error::Failed(format!("record {what}: reading its content failed: {s}"))
            }
        }),
    }
}

/// The parent snapshot of a record source: the latest one of that source.
pub fn parent_of<'a>(snapshots: &'a [SnapshotEntry], source: &str) -> Option<&'a SnapshotEntry> {
    snapshots
        .iter()
        .filter(|s| s.snapshot.source == source)
        .max_by_key(|s| s.snapshot.time)
}

/// Back up one record source.
pub async fn backup_records(
    repo: &Repository,
    connector: &dyn Connector,
    opts: &RecordBackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupReport> {
    let time = Utc::now();
    let collections = connector
        .collections()
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    let session = Session::start(repo, progress.clone()).await?;
    let result = run(&session, connector, opts, &collections, time, &progress).await;
    let (snapshot, unreadable, warnings) = match result {
        Ok(v) => v,
        Err(e) => {
            session.abandon().await;
            return Err(e);
        }
    };
    let mut all_warnings = session.warnings().to_vec();
    all_warnings.extend(warnings);
    let done = session.commit(snapshot).await?;
    Ok(BackupReport {
        id: done.id,
        snapshot: done.snapshot,
        committed: done.committed,
        lagging: done.lagging,
        unreadable,
        warnings: all_warnings,
    })
}

type RunOutput = (Snapshot, Vec<(String, String)>, Vec<String>);

async fn run(
    session: &Session,
    connector: &dyn Connector,
    opts: &RecordBackupOptions,
    collections: &[Collection],
    time: DateTime<Utc>,
    progress: &Progress,
) -> Result<RunOutput> {
    let repo = session.repo();
    let index = session.index();
    // Never a snapshot an erasure or retention replaced (kept only by an
    // Object Lock): its tree still holds the removed records.
    let superseded = crate::erasures::superseded(repo).await?;
    let current: Vec<SnapshotEntry> = session
        .snapshots()
        .iter()
        .filter(|s| !superseded.contains(&s.id))
        .cloned()
        .collect();
    let parent = parent_of(&current, &opts.source).cloned();
    let parent_root: HashMap<String, Node> = match &parent {
        Some(p) => repo
            .load_tree(index, &p.snapshot.tree)
            .await?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect(),
        None => HashMap::new(),
    };
    let parent_cursors = parent
        .as_ref()
        .map(|p| p.snapshot.cursors.clone())
        .unwrap_or_default();
    let saver = session.saver();
    let suppressed = Suppressed::load(repo).await?;
    let mut summary = Summary::default();
    let mut cursors = BTreeMap::new();
    let mut root_nodes = Vec::new();
    // Partitions written in this run, by collection (for the customer index).
    let mut written: HashMap<String, Vec<PartInput>> = HashMap::new();
    let mut unreadable = Vec::new();
    let mut warnings = Vec::new();
    let mut listed: HashSet<String> = HashSet::new();
    for coll in collections {
        listed.insert(coll.id.clone());
        let prev = parent_root
            .get(&coll.id)
            .filter(|n| n.kind == NodeKind::Dir);
        let prev_cursor = parent_cursors.get(&coll.id);
        let reconcile = opts.full
            || prev_cursor.is_none()
            || opts
                .reconcile_every
                .zip(prev_cursor)
                .is_some_and(|(every, c)| time - c.full_sync >= every);
        // A cursor stored in blobs is read only now, when it is needed.
        let loaded = match prev_cursor.filter(|_| !reconcile) {
            None => None,
            Some(c) => match repo.load_cursor(index, c).await {
                Ok(v) => Some(v),
                Err(e) => {
                    warnings.push(format!(
                        "collection {}: the parent snapshot's cursor is unreadable; listed in full: {e}",
                        coll.id
                    ));
                    None
                }
            },
        };
        let cursor_in = loaded.as_ref();
        let mut sink = Sink {
            budget: opts.state_memory,
            saver: saver.clone(),
            repo,
            index,
            parent_tree: prev.and_then(|n| n.subtree),
            state: None,
            collection: coll,
            mode: opts.mode,
            now: time,
            // A sync without cursor is a full listing even if the connector forgets to say so.
            seen: cursor_in.is_none().then(HashSet::new),
            counts: Counts::default(),
            warnings: Vec::new(),
            progress,
            suppressed: &suppressed,
            source: &opts.source,
            index_mentions: opts.index_mentions,
            jurisdiction: opts.jurisdiction.as_deref(),
            suppressed_count: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            pending: Vec::new(),
            pending_bytes: 0,
        };
        let mut synced = connector.sync(coll, cursor_in, &mut sink).await;
        if synced.is_ok() {
            // The records still in flight belong to this sync.
            if let Err(e) = sink.drain().await {
                synced = Err(ConnectorError::Sink(e.to_string()));
            }
        }
        sink.abandon().await;
        let cursor = match synced {
            Ok(c) => c,
            Err(ConnectorError::Sink(e)) => {
                return Err(Error::Failed(format!("collection {}: {e}", coll.id)))
            }
            Err(e) => {
                // Keep the previous state and cursor of this collection; report it.
                unreadable.push((format!("collection {}", coll.id), e.to_string()));
                if let Some(p) = prev {
                    root_nodes.push(p.clone());
                }
                if let Some(c) = prev_cursor {
                    cursors.insert(coll.id.clone(), c.clone());
                }
                continue;
            }
        };
        sink.finish_reset().await?;
        warnings.append(&mut sink.warnings);
        summary.records_suppressed += sink.suppressed_count;
        summary.records_new += sink.counts.new;
        summary.records_changed += sink.counts.changed;
        summary.records_deleted += sink.counts.deleted;
        let full_sync = if cursor_in.is_none() || sink.seen.is_some() {
            time
        } else {
            prev_cursor.map(|c| c.full_sync).unwrap_or(time)
        };
        let stored = {
            let saver = saver.clone();
            let c = CollectionCursor::inline(cursor, full_sync);
            tokio::task::spawn_blocking(move || saver.save_cursor(c))
                .await
                .map_err(|e| Error::Failed(format!("cursor task panicked: {e}")))??
        };
        cursors.insert(coll.id.clone(), stored);
        let coll_node = match sink.state.take() {
            // Nothing changed: the parent's collection tree stands as it is.
            None => prev.cloned(),
            Some(state) => {
                let count = state.len();
                progress
                    .partitions_parked
                    .fetch_add(state.parked, std::sync::atomic::Ordering::Relaxed);
                let saver = saver.clone();
                let name = coll.id.clone();
                let (tree, inputs) =
                    tokio::task::spawn_blocking(move || state.write(&saver, &name))
                        .await
                        .map_err(|e| Error::Failed(format!("tree task panicked: {e}")))??;
                written.insert(coll.id.clone(), inputs);
                (count > 0 || opts.mode == Mode::Archive).then(|| {
                    let mut n = Node::new(coll.id.as_bytes(), NodeKind::Dir);
                    n.subtree = Some(tree);
                    n.meta.insert("name".into(), coll.name.clone());
                    n.meta.insert(RECORDS_KEY.into(), count.to_string());
                    n
                })
            }
        };
        if let Some(n) = coll_node {
            root_nodes.push(n);
        }
    }
    // Collections gone from the source: kept in archive mode, dropped in mirror mode.
    if opts.mode == Mode::Archive {
        for (name, node) in &parent_root {
            if !listed.contains(name) {
                warnings.push(format!(
                    "collection {name} is no longer listed by the source; kept (archive mode)"
                ));
                root_nodes.push(node.clone());
                if let Some(c) = parent_cursors.get(name) {
                    cursors.insert(name.clone(), c.clone());
                }
            }
        }
    }
    // Totals: every collection node carries its record count.
    summary.collections = root_nodes.len() as u64;
    summary.records_total = root_nodes
        .iter()
        .filter_map(|n| n.meta.get(RECORDS_KEY)?.parse::<u64>().ok())
        .sum();
    summary.records_unchanged = summary
        .records_total
        .saturating_sub(summary.records_new + summary.records_changed);
    summary.unreadable = unreadable.len() as u64;
    // The customer index: partitions written now come with their nodes; the
    // others are the parent's (known by tree id, or read from its trees).
    let mut inputs = Vec::new();
    for n in &root_nodes {
        match (written.remove(&n.name), n.subtree) {
            (Some(w), _) => inputs.extend(w),
            (None, Some(ct)) if n.kind == NodeKind::Dir => {
                for part in repo.load_tree(index, &ct).await? {
                    if let Some(pt) = part.subtree.filter(|_| part.kind == NodeKind::Dir) {
                        inputs.push(PartInput {
                            collection: n.name.clone(),
                            partition: part.name.clone(),
                            tree: pt,
                            nodes: None,
                            records: None,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    let previous = match &parent {
        Some(p) => crate::customer::index_parts(repo, p.snapshot.customer_index)
            .await
            .unwrap_or_else(|e| {
                warnings.push(format!(
                    "the parent's customer index is unreadable; rebuilt: {e}"
                ));
                HashMap::new()
            }),
        None => HashMap::new(),
    };
    let (customer_index, mut w) =
        crate::customer::write_index(repo, index, inputs, &previous).await?;
    warnings.append(&mut w);
    let saver2 = saver.clone();
    let tree = tokio::task::spawn_blocking(move || saver2.save_tree(root_nodes))
        .await
        .map_err(|e| Error::Failed(format!("tree task panicked: {e}")))??;
    let snapshot = Snapshot {
        time,
        time_zone: opts.time_zone.clone(),
        source: opts.source.clone(),
        paths: Vec::new(),
        hostname: opts.hostname.clone(),
        username: std::env::var("USER").unwrap_or_default(),
        tags: opts.tags.clone(),
        tree,
        parent: parent.map(|p| p.id),
        summary,
        program: format!("custos {}", env!("CARGO_PKG_VERSION")),
        source_type: Some(opts.source_type.clone()),
        cursors,
        customer_index: Some(customer_index),
    };
    Ok((snapshot, unreadable, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::KdfParams;
    use crate::repo::InitOptions;
    use crate::target::store::StoreTarget;
    use crate::target::TargetRef;
    use custos_connectors::{Capabilities, Cursor, Health, RecordKind};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A source held in memory: collection → id → (body, flags). Its cursor is
    /// a version number; a sync from version v sends what changed after v.
    #[derive(Default)]
    struct MemSource {
        state: Mutex<MemState>,
        fetched: AtomicUsize,
    }

    #[derive(Default)]
    struct MemState {
        version: u64,
        /// (collection, id) → (body, flags, version changed, body version, deleted)
        items: BTreeMap<(String, String), Item>,
    }

    #[derive(Clone)]
    struct Item {
        body: Vec<u8>,
        /// Creation time (RFC 3339); None: 2026-03-04.
        created: Option<&'static str>,
        flags: String,
        changed: u64,
        body_changed: u64,
        deleted: bool,
    }

    impl MemSource {
        fn put(&self, coll: &str, id: &str, body: &[u8]) {
            self.put_at(coll, id, body, None);
        }
        fn put_at(&self, coll: &str, id: &str, body: &[u8], created: Option<&'static str>) {
            let mut s = self.state.lock().unwrap();
            s.version += 1;
            let v = s.version;
            s.items.insert(
                (coll.into(), id.into()),
                Item {
                    body: body.to_vec(),
                    created,
                    flags: String::new(),
                    changed: v,
                    body_changed: v,
                    deleted: false,
                },
            );
        }
        fn flag(&self, coll: &str, id: &str, flags: &str) {
            let mut s = self.state.lock().unwrap();
            s.version += 1;
            let v = s.version;
            let it = s
                .items
                .get_mut(&(coll.to_string(), id.to_string()))
                .unwrap();
            it.flags = flags.into();
            it.changed = v;
        }
        fn delete(&self, coll: &str, id: &str) {
            let mut s = self.state.lock().unwrap();
            s.version += 1;
            let v = s.version;
            let it = s
                .items
                .get_mut(&(coll.to_string(), id.to_string()))
                .unwrap();
            it.deleted = true;
            it.changed = v;
        }
    }

    fn record(coll: &str, id: &str, it: &Item) -> Record {
        Record {
            id: id.into(),
            collection: coll.into(),
            kind: RecordKind::Email,
            created: Some(
                DateTime::parse_from_rfc3339(it.created.unwrap_or("2026-03-04T05:06:07Z"))
                    .unwrap()
                    .with_timezone(&Utc),
            ),
            updated: None,
            participants: vec!["ana@example.org".into()],
            customer_ids: vec!["email:ana@example.org".into()],
            jurisdiction: Some("PT".into()),
            subject: Some("hello".into()),
            text: None,
            attachments: vec![],
            payload: Payload::Bytes(it.body.clone()),
            payload_ext: "eml".into(),
            deleted: false,
            meta: BTreeMap::from([("flags".to_string(), it.flags.clone())]),
        }
    }

    #[async_trait]
    impl Connector for MemSource {
        fn name(&self) -> &str {
            "mem"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                reports_deletions: true,
                reports_edits: true,
                has_attachments: false,
                metadata_updates: true,
            }
        }
        async fn check(&self) -> custos_connectors::Result<Health> {
            Ok(Health {
                summary: "ok".into(),
            })
        }
        async fn collections(&self) -> custos_connectors::Result<Vec<Collection>> {
            let s = self.state.lock().unwrap();
            let mut c: Vec<String> = s.items.keys().map(|(c, _)| c.clone()).collect();
            c.dedup();
            Ok(c.into_iter()
                .map(|id| Collection {
                    name: id.clone(),
                    id,
                })
                .collect())
        }
        async fn sync(
            &self,
            coll: &Collection,
            cursor: Option<&Cursor>,
            sink: &mut dyn ChangeSink,
        ) -> custos_connectors::Result<Cursor> {
            let since = cursor.and_then(|c| c.as_u64().or_else(|| c["v"].as_u64()));
            let (version, items): (u64, Vec<(String, Item)>) = {
                let s = self.state.lock().unwrap();
                (
                    s.version,
                    s.items
                        .iter()
                        .filter(|((c, _), _)| *c == coll.id)
                        .map(|((_, id), it)| (id.clone(), it.clone()))
                        .collect(),
                )
            };
            if since.is_none() {
                sink.push(Change::Reset).await?;
            }
            for (id, it) in items {
                match since {
                    None if !it.deleted => {
                        self.fetched.fetch_add(1, Ordering::Relaxed);
                        sink.push(Change::Upsert(record(&coll.id, &id, &it)))
                            .await?;
                    }
                    None => {}
                    Some(v) if it.changed > v => {
                        if it.deleted {
                            sink.push(Change::Delete { id }).await?;
                        } else if it.body_changed > v {
                            self.fetched.fetch_add(1, Ordering::Relaxed);
                            sink.push(Change::Upsert(record(&coll.id, &id, &it)))
                                .await?;
                        } else {
                            sink.push(Change::UpdateMeta {
                                id,
                                meta: BTreeMap::from([("flags".to_string(), it.flags.clone())]),
                            })
                            .await?;
                        }
                    }
                    Some(_) => {}
                }
            }
            // Collection `BIG` returns a cursor far above CURSOR_INLINE_MAX,
            // growing with the version like an mbox cursor's digest list.
            if coll.id == "BIG" {
                let pad: String = (0..version * 2_000)
                    .map(|i| char::from(b"0123456789abcdef"[(i * 7919 % 16) as usize]))
                    .collect();
                return Ok(serde_json::json!({ "v": version, "pad": pad }));
            }
            Ok(serde_json::json!(version))
        }
    }

    fn opts(mode: Mode) -> RecordBackupOptions {
        RecordBackupOptions {
            source: "mem".into(),
            source_type: "mem".into(),
            mode,
            tags: vec![],
            hostname: "h".into(),
            time_zone: "UTC".into(),
            reconcile_every: None,
            full: false,
            index_mentions: false,
            jurisdiction: None,
            state_memory: STATE_MEMORY,
        }
    }

    async fn repo() -> Repository {
        let t: TargetRef = Arc::new(StoreTarget::memory("m"));
        let o = InitOptions {
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            ..Default::default()
        };
        Repository::init(vec![t], b"pw", &o).await.unwrap()
    }

    /// (collection/partition/name → (content, meta)) of a snapshot.
    async fn contents(
        repo: &Repository,
        snap: &Snapshot,
    ) -> BTreeMap<String, (Vec<u8>, BTreeMap<String, String>)> {
        let (index, _) = repo.load_index().await.unwrap();
        let mut out = BTreeMap::new();
        for c in repo.load_tree(&index, &snap.tree).await.unwrap() {
            for p in repo.load_tree(&index, &c.subtree.unwrap()).await.unwrap() {
                for r in repo.load_tree(&index, &p.subtree.unwrap()).await.unwrap() {
                    let mut body = Vec::new();
                    for b in &r.content {
                        body.extend(
                            repo.read_blob(&index, crate::blob::BlobType::Data, b)
                                .await
                                .unwrap(),
                        );
                    }
                    out.insert(
                        format!("{}/{}/{}", c.name, p.name, r.name),
                        (body, r.meta.clone()),
                    );
                }
            }
        }
        out
    }

    /// A fresh repository opened with its admin key, and again with a
    /// backup key added to it.
    async fn admin_and_backup_key() -> (Repository, Repository) {
        let admin = repo().await;
        let cheap = KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        admin
            .add_key(crate::crypto::Role::Backup, b"bk", cheap)
            .await
            .unwrap();
        let (backup, _) = Repository::open(admin.targets().to_vec(), b"bk")
            .await
            .unwrap();
        (admin, backup)
    }

    /// A cursor above CURSOR_INLINE_MAX is stored in tree blobs the snapshot
    /// names, a small one stays inline; a backup key writes and reads them
    /// back (the incremental run fetches only what changed), and prune and
    /// check count them as the snapshot's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_cursor_is_stored_in_blobs_and_read_back() {
        let (admin, backup) = admin_and_backup_key().await;
        let src = MemSource::default();
        for i in 0..20 {
            src.put("BIG", &format!("b-{i}"), format!("big {i}").as_bytes());
        }
        src.put("INBOX", "i-0", b"small");
        let o = opts(Mode::Archive);
        let r1 = backup_records(&backup, &src, &o, Default::default())
            .await
            .unwrap();
        let big = &r1.snapshot.cursors["BIG"];
        assert!(!big.cursor_blobs.is_empty(), "{big:?}");
        assert_eq!(big.cursor, serde_json::Value::Null);
        let small = &r1.snapshot.cursors["INBOX"];
        assert!(small.cursor_blobs.is_empty());
        assert_eq!(small.cursor, serde_json::json!(21));
        // The stored snapshot document is small; the cursor reads back whole.
        let doc = serde_json::to_vec(&r1.snapshot).unwrap();
        assert!(doc.len() < 4096, "snapshot document of {} bytes", doc.len());
        let (listed, _) = backup.snapshots().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].snapshot, r1.snapshot);
        let (index, _) = backup.load_index().await.unwrap();
        let cursor = backup.load_cursor(&index, big).await.unwrap();
        assert_eq!(cursor["v"], 21);
        assert_eq!(cursor["pad"].as_str().unwrap().len(), 42_000);
        assert_eq!(src.fetched.load(Ordering::Relaxed), 21);

        // Incremental: only the new records are fetched, so the cursor came back.
        for i in 20..25 {
            src.put("BIG", &format!("b-{i}"), format!("big {i}").as_bytes());
        }
        let r2 = backup_records(&backup, &src, &o, Default::default())
            .await
            .unwrap();
        assert_eq!(src.fetched.load(Ordering::Relaxed), 26);
        assert_eq!(r2.snapshot.summary.records_new, 5);
        assert_eq!(r2.snapshot.summary.records_total, 26);
        let big2 = &r2.snapshot.cursors["BIG"];
        let (index, _) = backup.load_index().await.unwrap();
        assert_eq!(backup.load_cursor(&index, big2).await.unwrap()["v"], 26);
        assert_eq!(r2.snapshot.cursors["INBOX"].cursor, serde_json::json!(26));

        // Prune's walk counts the cursor blobs as used; check reads them.
        let (listed, _) = admin.snapshots().await.unwrap();
        let (used, _) = crate::prune::used_blobs(&admin, &index, &listed)
            .await
            .unwrap();
        for id in big.cursor_blobs.iter().chain(&big2.cursor_blobs) {
            assert!(used.contains(id), "cursor blob {id} not used");
        }
        let report = crate::check::check(&backup, crate::check::ReadData::None)
            .await
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// A backup key runs incremental record backups (archive mode, customer
    /// index with mentions) without reading any content: the admin key reads
    /// what it wrote, and the backup key is refused content.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_key_runs_incremental_record_backups() {
        let (admin, backup) = admin_and_backup_key().await;
        let src = MemSource::default();
        for i in 0..10 {
            src.put(
                "INBOX",
                &format!("1-{i}"),
                format!("message {i}").as_bytes(),
            );
        }
        let mut o = opts(Mode::Archive);
        o.index_mentions = true;
        let r1 = backup_records(&backup, &src, &o, Default::default())
            .await
            .unwrap();
        assert_eq!(r1.snapshot.summary.records_total, 10);
        for i in 10..13 {
            src.put(
                "INBOX",
                &format!("1-{i}"),
                format!("message {i}").as_bytes(),
            );
        }
        src.delete("INBOX", "1-0");
        src.flag("INBOX", "1-5", "\\Flagged");
        let r2 = backup_records(&backup, &src, &o, Default::default())
            .await
            .unwrap();
        let s = &r2.snapshot.summary;
        assert_eq!(
            (
                s.records_new,
                s.records_changed,
                s.records_deleted,
                s.records_total
            ),
            (3, 1, 1, 13)
        );
        let c = contents(&admin, &r2.snapshot).await;
        assert_eq!(c["INBOX/2026-03/1-12.eml"].0, b"message 12");
        assert_eq!(c["INBOX/2026-03/1-0.eml"].0, b"message 0");
        assert_eq!(c["INBOX/2026-03/1-5.eml"].1["m.flags"], "\\Flagged");
        let (index, _) = backup.load_index().await.unwrap();
        let any = index_first_data_blob(&backup, &index, &r2.snapshot).await;
        let e = backup
            .read_blob(&index, crate::blob::BlobType::Data, &any)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_ROLE, "{e}");
    }

    /// The first content blob of a record snapshot (walking trees only).
    async fn index_first_data_blob(
        repo: &Repository,
        index: &crate::index::Index,
        snap: &Snapshot,
    ) -> crate::id::Id {
        for c in repo.load_tree(index, &snap.tree).await.unwrap() {
            for p in repo.load_tree(index, &c.subtree.unwrap()).await.unwrap() {
                for r in repo.load_tree(index, &p.subtree.unwrap()).await.unwrap() {
                    if let Some(b) = r.content.first() {
                        return *b;
                    }
                }
            }
        }
        panic!("no content blob in the snapshot")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incremental_archive_and_mirror_semantics() {
        for mode in [Mode::Archive, Mode::Mirror] {
            let repo = repo().await;
            let src = MemSource::default();
            for i in 0..20 {
                src.put(
                    "INBOX",
                    &format!("1-{i}"),
                    format!("message {i}").as_bytes(),
                );
            }
            src.put("Sent", "1-1", b"sent one");
            let progress = Arc::new(Progress::default());
            let r1 = backup_records(&repo, &src, &opts(mode), progress.clone())
                .await
                .unwrap();
            assert_eq!(r1.snapshot.summary.records_new, 21);
            assert_eq!(r1.snapshot.summary.records_total, 21);
            assert_eq!(r1.snapshot.summary.collections, 2);
            assert_eq!(src.fetched.load(Ordering::Relaxed), 21);
            let c1 = contents(&repo, &r1.snapshot).await;
            assert_eq!(c1["INBOX/2026-03/1-7.eml"].0, b"message 7");
            assert_eq!(
                c1["INBOX/2026-03/1-7.eml"].1["customer_ids"],
                "[\"email:ana@example.org\"]"
            );

            // Add 3, delete 2, flag 1: only the 3 new bodies are fetched.
            for i in 20..23 {
                src.put(
                    "INBOX",
                    &format!("1-{i}"),
                    format!("message {i}").as_bytes(),
                );
            }
            src.delete("INBOX", "1-0");
            src.delete("INBOX", "1-1");
            src.flag("INBOX", "1-5", "\\Flagged");
            let r2 = backup_records(&repo, &src, &opts(mode), progress.clone())
                .await
                .unwrap();
            assert_eq!(
                src.fetched.load(Ordering::Relaxed),
                24,
                "{mode:?}: only new bodies fetched"
            );
            let s = &r2.snapshot.summary;
            assert_eq!(
                (s.records_new, s.records_changed, s.records_deleted),
                (3, 1, 2),
                "{mode:?}"
            );
            let c2 = contents(&repo, &r2.snapshot).await;
            assert_eq!(c2["INBOX/2026-03/1-5.eml"].1["m.flags"], "\\Flagged");
            assert_eq!(c2["INBOX/2026-03/1-22.eml"].0, b"message 22");
            match mode {
                Mode::Archive => {
                    assert_eq!(s.records_total, 24);
                    assert_eq!(c2["INBOX/2026-03/1-0.eml"].1["deleted"], "true");
                    assert_eq!(c2["INBOX/2026-03/1-0.eml"].0, b"message 0");
                }
                Mode::Mirror => {
                    assert_eq!(s.records_total, 22);
                    assert!(!c2.contains_key("INBOX/2026-03/1-0.eml"));
                }
            }
            // The untouched collection kept its tree blob: nothing fetched, nothing rewritten.
            assert_eq!(c2["Sent/2026-03/1-1.eml"], c1["Sent/2026-03/1-1.eml"]);

            // No change: nothing fetched, the same tree.
            let r3 = backup_records(&repo, &src, &opts(mode), progress.clone())
                .await
                .unwrap();
            assert_eq!(src.fetched.load(Ordering::Relaxed), 24);
            assert_eq!(r3.snapshot.tree, r2.snapshot.tree, "{mode:?}");
            assert_eq!(
                r3.snapshot.summary.records_new + r3.snapshot.summary.records_changed,
                0
            );

            // A full resync (cursor dropped) yields the same state.
            let mut full = opts(mode);
            full.full = true;
            let r4 = backup_records(&repo, &src, &full, progress).await.unwrap();
            let c4 = contents(&repo, &r4.snapshot).await;
            assert_eq!(
                c4.keys().collect::<Vec<_>>(),
                c2.keys().collect::<Vec<_>>(),
                "{mode:?}"
            );
        }
    }

    /// A working state over its memory budget parks cold partitions in the
    /// spill file and reads them back when a change lands in them: with a
    /// budget so small that every partition but the one being changed is
    /// parked, every run stores exactly what a run holding everything
    /// stores — new records interleaved across months, then edits, flag
    /// updates and deletions landing in parked and dropped partitions.
    #[tokio::test]
    async fn a_state_over_its_budget_parks_partitions_and_stores_the_same() {
        const MONTHS: [&str; 4] = [
            "2025-11-10T00:00:00Z",
            "2025-12-10T00:00:00Z",
            "2026-01-10T00:00:00Z",
            "2026-02-10T00:00:00Z",
        ];
        for mode in [Mode::Archive, Mode::Mirror] {
            let src = MemSource::default();
            // Ids sort month-interleaved, the order the source sends them in.
            for i in 0..25 {
                for (m, created) in MONTHS.iter().enumerate() {
                    let id = format!("{i:02}-{m}");
                    let body = format!("Subject: {id}\r\n\r\nbody of {id}\r\n");
                    src.put_at("INBOX", &id, body.as_bytes(), Some(created));
                }
            }
            let (small, large) = (repo().await, repo().await);
            let tiny = RecordBackupOptions {
                state_memory: 1,
                ..opts(mode)
            };
            let runs = |step: &'static str| {
                let (src, small, large, tiny) = (&src, &small, &large, &tiny);
                async move {
                    let parked = Arc::new(Progress::default());
                    let a = backup_records(small, src, tiny, parked.clone())
                        .await
                        .unwrap();
                    let held = Arc::new(Progress::default());
                    let b = backup_records(large, src, &opts(mode), held.clone())
                        .await
                        .unwrap();
                    // The two runs see a deletion at different instants.
                    let seen = |mut c: BTreeMap<String, (Vec<u8>, BTreeMap<String, String>)>| {
                        for (_, meta) in c.values_mut() {
                            if let Some(t) = meta.get_mut(keys::DELETED_SEEN) {
                                *t = "seen".into();
                            }
                        }
                        c
                    };
                    let (ca, cb) = (
                        seen(contents(small, &a.snapshot).await),
                        seen(contents(large, &b.snapshot).await),
                    );
                    for (k, v) in &ca {
                        assert_eq!(Some(v), cb.get(k), "{mode:?} {step}: {k} stored otherwise");
                    }
                    assert_eq!(ca.len(), cb.len(), "{mode:?} {step}");
                    // Sealed sizes vary with the random spread of blobs over packs.
                    let counts = |r: &BackupReport| Summary {
                        duration_seconds: 0.0,
                        bytes_stored: 0,
                        ..r.snapshot.summary.clone()
                    };
                    assert_eq!(counts(&a), counts(&b), "{mode:?} {step}");
                    assert_eq!(held.partitions_parked.load(Ordering::Relaxed), 0);
                    (parked.partitions_parked.load(Ordering::Relaxed), ca.len())
                }
            };
            let (parked, n) = runs("first run").await;
            assert_eq!(n, 100);
            assert!(parked >= 50, "{mode:?}: only {parked} partitions parked");

            // Changes spread over every month of the parent.
            for i in (0..25).step_by(3) {
                src.put_at("INBOX", &format!("{i:02}-0"), b"edited", Some(MONTHS[0]));
                src.put_at("INBOX", &format!("new-{i:02}"), b"late", Some(MONTHS[2]));
                src.flag("INBOX", &format!("{i:02}-1"), "\\Seen");
                src.delete("INBOX", &format!("{i:02}-3"));
            }
            let (parked, n) = runs("second run").await;
            assert!(parked > 0, "{mode:?}");
            let want = if mode == Mode::Archive { 109 } else { 100 };
            assert_eq!(n, want, "{mode:?}");
        }
    }

    /// An incremental run reads only the parent partitions a change touches
    /// (observed through `Progress::partitions_loaded`), and the untouched
    /// ones keep their records and their tree blobs.
    #[tokio::test]
    async fn incremental_runs_read_only_the_partitions_they_touch() {
        const MONTHS: [&str; 3] = [
            "2026-01-10T00:00:00Z",
            "2026-02-10T00:00:00Z",
            "2026-03-10T00:00:00Z",
        ];
        for mode in [Mode::Archive, Mode::Mirror] {
            let repo = repo().await;
            let src = MemSource::default();
            for (m, created) in MONTHS.iter().enumerate() {
                for i in 0..10 {
                    let id = format!("{m}-{i}");
                    src.put_at("INBOX", &id, id.as_bytes(), Some(created));
                }
            }
            let run = |progress: Arc<Progress>| {
                let (repo, src) = (&repo, &src);
                async move {
                    backup_records(repo, src, &opts(mode), progress)
                        .await
                        .unwrap()
                }
            };
            let first = Arc::new(Progress::default());
            let r1 = run(first.clone()).await;
            assert_eq!(r1.snapshot.summary.records_total, 30);
            assert_eq!(first.partitions_loaded.load(Ordering::Relaxed), 0);
            let c1 = contents(&repo, &r1.snapshot).await;

            // A new record in February: only February's partition is read.
            src.put_at("INBOX", "1-new", b"late", Some(MONTHS[1]));
            let p2 = Arc::new(Progress::default());
            let r2 = run(p2.clone()).await;
            assert_eq!(p2.partitions_loaded.load(Ordering::Relaxed), 1, "{mode:?}");
            let c2 = contents(&repo, &r2.snapshot).await;
            assert_eq!(c2.len(), 31, "{mode:?}");
            assert_eq!(c2["INBOX/2026-02/1-new.eml"].0, b"late");
            for m in ["2026-01", "2026-03"] {
                let part = |c: &BTreeMap<String, (Vec<u8>, BTreeMap<String, String>)>| {
                    c.iter()
                        .filter(|(k, _)| k.starts_with(&format!("INBOX/{m}/")))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(part(&c2), part(&c1), "{mode:?}: {m} untouched");
                assert_eq!(part(&c2).len(), 10);
            }

            // A deletion in January reads January only.
            src.delete("INBOX", "0-3");
            let p3 = Arc::new(Progress::default());
            let r3 = run(p3.clone()).await;
            assert_eq!(p3.partitions_loaded.load(Ordering::Relaxed), 1, "{mode:?}");
            assert_eq!(r3.snapshot.summary.records_deleted, 1, "{mode:?}");

            // No change: nothing read.
            let p4 = Arc::new(Progress::default());
            let r4 = run(p4.clone()).await;
            assert_eq!(p4.partitions_loaded.load(Ordering::Relaxed), 0, "{mode:?}");
            assert_eq!(r4.snapshot.tree, r3.snapshot.tree);
        }
    }
}
