//! Snapshot trees: nodes for files and records, stored as tree blobs.
//!
//! A tree blob is JSON, either a leaf `{"nodes":[…]}` (sorted by name) or,
//! for a large collection, a split node `{"parts":[{"tree":id,"count":n},…]}`
//! whose parts are leaves cut at content-defined boundaries of the entry names.
//! Inserting a record into a 100 000-entry folder then rewrites one part and
//! the small part list, not the whole listing (FORMAT.md, "Trees").

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;

/// Entries above which a tree is split into parts.
pub const SPLIT_THRESHOLD: usize = 1000;
/// Smallest part (except the last).
const MIN_PART: usize = 64;
/// Largest part.
const MAX_PART: usize = 4096;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// A directory or collection; `subtree` names its tree blob.
    Dir,
    /// A regular file; `content` lists its data blobs.
    File,
    /// A symbolic link; `link_target` holds the target.
    Symlink,
    /// A communication record (email, message, ticket …); `content` is its original payload.
    Record,
    /// An attachment of a record.
    Attachment,
    /// A device, FIFO or socket: recorded, not restored.
    Special,
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Entry name (lossy UTF-8 when `name_raw` is set).
    pub name: String,
    /// The exact name bytes, base64, when the name is not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_raw: Option<String>,
    /// What this node is.
    pub kind: NodeKind,
    /// Content size in bytes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Unix permission bits and file type bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<chrono::DateTime<chrono::Utc>>,
    /// Status-change time in ns (change detection only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime_ns: Option<i64>,
    /// Inode number (change detection only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Owner ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Data blobs, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Id>,
    /// Keyed BLAKE3 of the whole content (the "content digest").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Id>,
    /// Tree blob of a directory/collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Id>,
    /// Symlink target (lossy UTF-8 when `link_target_raw` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// Exact symlink target bytes, base64, when not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target_raw: Option<String>,
    /// Key/value metadata (record ids, customer ids, jurisdiction, times …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Node {
    /// A bare node of `kind` named by raw bytes.
    pub fn new(name_bytes: &[u8], kind: NodeKind) -> Node {
        let (name, name_raw) = encode_name(name_bytes);
        Node {
            name,
            name_raw,
            kind,
            size: 0,
            mode: None,
            mtime: None,
            ctime_ns: None,
            inode: None,
            uid: None,
            gid: None,
            content: Vec::new(),
            digest: None,
            subtree: None,
            link_target: None,
            link_target_raw: None,
            meta: BTreeMap::new(),
        }
    }

    /// The exact name bytes.
    pub fn name_bytes(&self) -> Vec<u8> {
        decode_name(&self.name, self.name_raw.as_deref())
    }

    /// The exact link target bytes.
    pub fn link_target_bytes(&self) -> Option<Vec<u8>> {
        self.link_target
            .as_deref()
            .map(|t| decode_name(t, self.link_target_raw.as_deref()))
    }
}

/// Name bytes → (display string, raw base64 when not UTF-8).
pub fn encode_name(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(B64.encode(bytes)),
        ),
    }
}

fn decode_name(name: &str, raw: Option<&str>) -> Vec<u8> {
    raw.and_then(|r| B64.decode(r).ok())
        .unwrap_or_else(|| name.as_bytes().to_vec())
}

/// The JSON document of a tree blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TreeDoc {
    /// A leaf listing.
    Leaf { nodes: Vec<Node> },
    /// A split listing.
    Split { parts: Vec<TreePart> },
}

/// One part of a split tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreePart {
    /// Tree blob of the part (always a leaf).
    pub tree: Id,
    /// Entries in the part.
    pub count: u64,
}

/// Serialize `nodes` (sorted by name bytes here) into one or more tree blobs,
/// saving each through `save`; returns the id of the top blob.
pub fn write_tree(
    keys: &Keys,
    mut nodes: Vec<Node>,
    save: &dyn Fn(Vec<u8>) -> Result<Id>,
) -> Result<Id> {
    write_tree_in_place(keys, &mut nodes, save)
}

/// [`write_tree`] without taking the nodes: they are sorted by name bytes in
/// place and serialized by reference.
pub fn write_tree_in_place(
    keys: &Keys,
    nodes: &mut [Node],
    save: &dyn Fn(Vec<u8>) -> Result<Id>,
) -> Result<Id> {
    // Names are UTF-8 except for the rare `name_raw`: compare without allocating.
    nodes.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    write_sorted(keys, nodes, &|n| sort_key(n), &leaf_json, save)
}

/// A node already serialized (compact JSON, as in a leaf) with its name bytes.
#[derive(Debug, Clone)]
pub struct RawNode {
    pub name: Vec<u8>,
    pub json: Box<[u8]>,
}

impl RawNode {
    /// Serialize `node`.
    pub fn of(node: &Node) -> RawNode {
        RawNode {
            name: node.name_bytes(),
            json: serde_json::to_vec(node)
                .expect("node serializes")
                .into_boxed_slice(),
        }
    }
}

/// [`write_tree`] of nodes held serialized: the same blobs, byte for byte,
/// without materializing the nodes.
pub fn write_tree_raw(
    keys: &Keys,
    nodes: &mut [RawNode],
    save: &dyn Fn(Vec<u8>) -> Result<Id>,
) -> Result<Id> {
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let leaf = |nodes: &[RawNode]| {
        let len: usize = nodes.iter().map(|n| n.json.len() + 1).sum();
        let mut out = Vec::with_capacity(len + 12);
        out.extend_from_slice(b"{\"nodes\":[");
        for (i, n) in nodes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&n.json);
        }
        out.extend_from_slice(b"]}");
        out
    };
    write_sorted(
        keys,
        nodes,
        &|n| std::borrow::Cow::Borrowed(&n.name),
        &leaf,
        save,
    )
}

/// Leaf or split tree of `nodes`, sorted by name bytes.
fn write_sorted<T>(
    keys: &Keys,
    nodes: &[T],
    name: &dyn Fn(&T) -> std::borrow::Cow<'_, [u8]>,
    leaf: &dyn Fn(&[T]) -> Vec<u8>,
    save: &dyn Fn(Vec<u8>) -> Result<Id>,
) -> Result<Id> {
    if nodes.len() <= SPLIT_THRESHOLD {
        return save(leaf(nodes));
    }
    let mut parts = Vec::new();
    let mut start = 0;
    for i in 0..nodes.len() {
        let len = i + 1 - start;
        let boundary = keys.name_hash(&name(&nodes[i]))[0] == 0;
        if (len >= MIN_PART && boundary) || len >= MAX_PART {
            let part = &nodes[start..=i];
            parts.push(TreePart {
                tree: save(leaf(part))?,
                count: part.len() as u64,
            });
            start = i + 1;
        }
    }
    if start < nodes.len() {
        let part = &nodes[start..];
        parts.push(TreePart {
            tree: save(leaf(part))?,
            count: part.len() as u64,
        });
    }
    save(serde_json::to_vec(&TreeDoc::Split { parts }).expect("tree serializes"))
}

fn sort_key(n: &Node) -> std::borrow::Cow<'_, [u8]> {
    match n.name_raw {
        None => std::borrow::Cow::Borrowed(n.name.as_bytes()),
        Some(_) => std::borrow::Cow::Owned(n.name_bytes()),
    }
}

/// The JSON of `TreeDoc::Leaf { nodes }`, serialized from a borrowed slice.
fn leaf_json(nodes: &[Node]) -> Vec<u8> {
    #[derive(Serialize)]
    struct LeafRef<'a> {
        nodes: &'a [Node],
    }
    serde_json::to_vec(&LeafRef { nodes }).expect("tree serializes")
}

/// Parse a tree blob's plaintext.
pub fn parse_tree(id: &Id, plain: &[u8]) -> Result<TreeDoc> {
    serde_json::from_slice(plain)
        .map_err(|e| Error::corrupt(format!("tree blob {id}"), format!("json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;
    use std::cell::RefCell;
    use std::collections::HashMap;

    fn node(name: &str) -> Node {
        let mut n = Node::new(name.as_bytes(), NodeKind::Record);
        n.size = 10;
        n
    }

    #[test]
    fn borrowed_leaf_serializes_like_the_tree_doc() {
        let nodes = vec![node("a"), Node::new(b"b\xff", NodeKind::File)];
        let owned = serde_json::to_vec(&TreeDoc::Leaf {
            nodes: nodes.clone(),
        })
        .unwrap();
        assert_eq!(leaf_json(&nodes), owned);
    }

    #[test]
    fn raw_nodes_write_the_same_blobs() {
        let keys = Keys::derive(&MasterKey::generate());
        for count in [3, 5_000] {
            let mut nodes: Vec<Node> = (0..count)
                .rev()
                .map(|i| {
                    let mut n = node(&format!("r-{i}"));
                    n.meta.insert("subject".into(), format!("s \"{i}\""));
                    n
                })
                .collect();
            nodes.push(Node::new(b"odd\xfe", NodeKind::Record));
            let blobs = |raw: bool| {
                let store: RefCell<Vec<Vec<u8>>> = RefCell::default();
                let save = |b: Vec<u8>| -> Result<Id> {
                    let id = keys.blob_id(&b);
                    store.borrow_mut().push(b);
                    Ok(id)
                };
                let top = if raw {
                    let mut r: Vec<RawNode> = nodes.iter().map(RawNode::of).collect();
                    write_tree_raw(&keys, &mut r, &save).unwrap()
                } else {
                    write_tree(&keys, nodes.clone(), &save).unwrap()
                };
                (top, store.into_inner())
            };
            let (a, b) = (blobs(false), blobs(true));
            assert!(a.1.len() > usize::from(count > 1000), "{count}: split");
            assert_eq!(a, b, "{count} nodes");
        }
    }

    #[test]
    fn odd_names_survive_exactly() {
        let raw = b"bad\xffname";
        let n = Node::new(raw, NodeKind::File);
        assert!(n.name_raw.is_some());
        let back: Node = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back.name_bytes(), raw);
    }

    #[test]
    fn large_collections_split_and_a_small_change_rewrites_few_blobs() {
        let keys = Keys::derive(&MasterKey::generate());
        let store: RefCell<HashMap<Id, Vec<u8>>> = RefCell::default();
        let save = |b: Vec<u8>| -> Result<Id> {
            let id = keys.blob_id(&b);
            store.borrow_mut().insert(id, b);
            Ok(id)
        };
        let nodes: Vec<Node> = (0..20_000).map(|i| node(&format!("msg-{i:06}"))).collect();
        let top = write_tree(&keys, nodes.clone(), &save).unwrap();
        let before = store.borrow().len();
        let TreeDoc::Split { parts } = parse_tree(&top, &store.borrow()[&top]).unwrap() else {
            panic!("expected a split tree");
        };
        assert!(parts.len() > 10);
        assert_eq!(parts.iter().map(|p| p.count).sum::<u64>(), 20_000);
        // Insert one record: one part and the top list are new — or, when the
        // new name is itself a boundary (1 in 256 keys), the part it splits
        // into two. Never more.
        let mut more = nodes;
        more.push(node("msg-010000a"));
        write_tree(&keys, more, &save).unwrap();
        let new = store.borrow().len() - before;
        assert!((2..=3).contains(&new), "{new} blobs rewritten");
    }
}
