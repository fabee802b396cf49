//! Customer rights: identifiers, the customer index, and the suppression
//! ledger (see [`crate::rights`] for show / export / erase).
//!
//! **Identifiers** are typed and normalized before anything is hashed:
//! `email:` lower-cased and trimmed, `phone:` in E.164 (`+` and digits; `00`
//! becomes `+`; spaces, dots, dashes and parentheses dropped), anything else
//! (`crm:hubspot:123`) trimmed. A bare value is an email when it has an `@`,
//! a phone number when it is made of `+`, digits and separators. Aliases
//! (`[[customer]]` in the config) link several identifiers to one customer.
//!
//! **The customer index.** At backup, each partition of a record snapshot
//! (`/<collection>/<YYYY-MM>`) gets a part object listing its records with the
//! keys of the customers they name (record id, kind, creation time); a
//! snapshot's index document lists its partitions with their part objects.
//! Parts are shared between snapshots whenever a partition's tree is (same
//! tree id, same part), so a backup only indexes the partitions it rewrote.
//! Both are sealed metadata objects in `customers/`; only keyed hashes of
//! identifiers are stored ([`crate::crypto::Keys::customer_key`]), so erasing
//! a customer's records leaves no identifier behind.
//!
//! **The suppression ledger** (`suppressions/`): an erased customer's key is
//! suppressed; restore, export, restore-verify and later backups leave out
//! every record naming a suppressed customer, so an old copy restored later
//! does not bring them back. Entries are immutable documents; the latest
//! document per key decides (suppress or lift).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::records::keys;
use crate::repo::Repository;
use crate::tree::{Node, NodeKind};

/// Normalize one identifier (typed or bare); errors name it.
pub fn normalize(raw: &str) -> Result<String> {
    let raw = raw.trim();
    let bad = |why: &str| Error::Invalid(format!("customer identifier {raw:?}: {why}"));
    let (ty, value) = match raw.split_once(':') {
        Some((t, v)) if matches!(t, "email" | "phone") || (t == "crm" && !v.is_empty()) => {
            (t.to_string(), v.trim().to_string())
        }
        Some((t, v))
            if !t.is_empty()
                && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !raw.contains('@') =>
        {
            (t.to_ascii_lowercase(), v.trim().to_string())
        }
        _ if raw.contains('@') => ("email".into(), raw.to_string()),
        _ if !raw.is_empty()
            && raw
                .chars()
                .all(|c| c.is_ascii_digit() || " +-.()/".contains(c)) =>
        {
            ("phone".into(), raw.to_string())
        }
        _ => return Err(bad("give email:ADDRESS, phone:+NUMBER or TYPE:ID")),
    };
    if value.is_empty() {
        return Err(bad("empty value"));
    }
    match ty.as_str() {
        "email" => {
            let v = value.trim_matches(|c| c == '<' || c == '>').to_lowercase();
            let (local, domain) = v.split_once('@').ok_or_else(|| bad("not an address"))?;
            if local.is_empty() || domain.is_empty() || domain.contains('@') {
                return Err(bad("not an address"));
            }
            Ok(format!("email:{v}"))
        }
        "phone" => {
            let mut digits: String = value
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '+')
                .collect();
            if let Some(rest) = digits.strip_prefix("00") {
                digits = format!("+{rest}");
            }
            let ok = digits.starts_with('+')
                && digits[1..].chars().all(|c| c.is_ascii_digit())
                && (8..=16).contains(&digits.len());
            if !ok {
                return Err(bad(
                    "a phone number must be in international form (+ and 7 to 15 digits)",
                ));
            }
            Ok(format!("phone:{digits}"))
        }
        t => Ok(format!("{t}:{value}")),
    }
}

/// Named customers: each a set of identifiers (`[[customer]]` in the config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    /// name → normalized identifiers.
    pub named: BTreeMap<String, BTreeSet<String>>,
}

impl Aliases {
    /// Build from (name, raw identifiers); errors name the customer and identifier.
    pub fn new(entries: &[(String, Vec<String>)]) -> Result<Aliases> {
        let mut named = BTreeMap::new();
        for (name, ids) in entries {
            let set = ids
                .iter()
                .map(|i| {
                    normalize(i).map_err(|e| Error::Config(format!("[[customer]] {name:?}: {e}")))
                })
                .collect::<Result<BTreeSet<_>>>()?;
            if set.is_empty() {
                return Err(Error::Config(format!(
                    "[[customer]] {name:?}: ids is empty"
                )));
            }
            if named.insert(name.clone(), set).is_some() {
                return Err(Error::Config(format!(
                    "[[customer]] {name:?}: duplicate name"
                )));
            }
        }
        Ok(Aliases { named })
    }

    /// The identifiers `spec` stands for: an alias name, or an identifier
    /// (plus every identifier of an alias that lists it).
    pub fn resolve(&self, spec: &str) -> Result<BTreeSet<String>> {
        if let Some(set) = self.named.get(spec) {
            return Ok(set.clone());
        }
        let id = normalize(spec)?;
        let mut out: BTreeSet<String> = [id.clone()].into_iter().collect();
        for set in self.named.values().filter(|s| s.contains(&id)) {
            out.extend(set.iter().cloned());
        }
        Ok(out)
    }
}

/// The normalized identifiers a record node names (invalid ones are skipped:
/// they were stored as the connector gave them).
pub fn node_identifiers(node: &Node) -> Vec<String> {
    let mut raw: Vec<String> = Vec::new();
    // Its own customer ids, and mentions when the source indexes them.
    for key in [keys::CUSTOMER_IDS, keys::MENTIONED_IDS] {
        let ids: Vec<String> = node
            .meta
            .get(key)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        raw.extend(ids);
    }
    let mut out: Vec<String> = raw.iter().filter_map(|r| normalize(r).ok()).collect();
    out.sort();
    out.dedup();
    out
}

/// The customer keys a record node names.
pub fn node_keys(keys: &Keys, node: &Node) -> Vec<String> {
    node_identifiers(node)
        .iter()
        .map(|i| keys.customer_key(i))
        .collect()
}

// ---------------------------------------------------------------------------
// The index objects

/// One record in a part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    /// Record id (unique within the collection).
    pub id: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Keys of the customers the record names.
    pub customers: Vec<String>,
}

/// `customers/<id>`: the records of one partition tree that name customers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartDoc {
    /// The partition tree this part describes.
    pub tree: Id,
    /// Records naming at least one customer.
    pub records: Vec<PartRecord>,
}

/// One partition of a snapshot's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRef {
    pub collection: String,
    pub partition: String,
    pub tree: Id,
    pub part: Id,
}

/// Which document a `customers/` object holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CustomerObject {
    /// A snapshot's index: its partitions.
    Index { parts: Vec<PartRef> },
    /// One partition's records.
    Part(PartDoc),
}

/// A partition the index must describe: its tree, and its record nodes when
/// the caller has them in memory (a partition it just wrote).
#[derive(Debug, Clone)]
pub struct PartInput {
    pub collection: String,
    pub partition: String,
    pub tree: Id,
    pub nodes: Option<Vec<Node>>,
    /// The part's records when the caller built them already (see
    /// [`part_record`]); they win over `nodes`.
    pub records: Option<Vec<PartRecord>>,
}

fn build_part(keys: &Keys, tree: Id, nodes: &[Node]) -> PartDoc {
    let records = nodes.iter().filter_map(|n| part_record(keys, n)).collect();
    PartDoc { tree, records }
}

/// The entry of a record node in its partition's part (`None`: not a
/// record, or it names no customer).
pub fn part_record(keys: &Keys, n: &Node) -> Option<PartRecord> {
    if n.kind != NodeKind::Record {
        return None;
    }
    let customers = node_keys(keys, n);
    if customers.is_empty() {
        return None;
    }
    Some(PartRecord {
        id: n
            .meta
            .get(keys::RECORD_ID)
            .cloned()
            .unwrap_or_else(|| n.name.clone()),
        kind: n.meta.get(keys::KIND).cloned().unwrap_or_default(),
        created: n
            .meta
            .get(keys::CREATED)
            .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
            .map(|t| t.with_timezone(&Utc)),
        deleted: n.meta.get(keys::DELETED).is_some_and(|d| d == "true"),
        customers,
    })
}

/// The parts of a snapshot's index, by partition tree id.
pub async fn index_parts(repo: &Repository, index_doc: Option<Id>) -> Result<HashMap<Id, Id>> {
    let Some(id) = index_doc else {
        return Ok(HashMap::new());
    };
    match repo
        .load_object::<CustomerObject>(ObjectKind::Customer, &id)
        .await?
    {
        CustomerObject::Index { parts } => {
            Ok(parts.into_iter().map(|p| (p.tree, p.part)).collect())
        }
        CustomerObject::Part(_) => Err(Error::corrupt(
            ObjectKind::Customer.name(&id),
            "a snapshot's customer index names a part object",
        )),
    }
}

/// Write the index of a snapshot whose partitions are `inputs`: parts known
/// from `previous` (by tree id) are reused, the others built (from the nodes
/// given, or from the partition tree read through `blob_index`) and stored on
/// every target. Returns the index document's id and warnings (a target that
/// did not take an object: `sync` copies it later).
pub async fn write_index(
    repo: &Repository,
    blob_index: &Index,
    inputs: Vec<PartInput>,
    previous: &HashMap<Id, Id>,
) -> Result<(Id, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut parts = Vec::with_capacity(inputs.len());
    for p in inputs {
        let part = match previous.get(&p.tree) {
            Some(part) => *part,
            None => {
                let doc = match (p.records, p.nodes) {
                    (Some(records), _) => PartDoc {
                        tree: p.tree,
                        records,
                    },
                    (None, Some(nodes)) => build_part(repo.keys(), p.tree, &nodes),
                    (None, None) => build_part(
                        repo.keys(),
                        p.tree,
                        &repo.load_tree(blob_index, &p.tree).await?,
                    ),
                };
                let doc = CustomerObject::Part(doc);
                let (id, results) = repo
                    .save_object(repo.targets(), ObjectKind::Customer, &doc)
                    .await;
                note_failures(
                    repo,
                    &mut warnings,
                    &ObjectKind::Customer.name(&id),
                    results,
                )?;
                id
            }
        };
        parts.push(PartRef {
            collection: p.collection,
            partition: p.partition,
            tree: p.tree,
            part,
        });
    }
    let doc = CustomerObject::Index { parts };
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Customer, &doc)
        .await;
    note_failures(
        repo,
        &mut warnings,
        &ObjectKind::Customer.name(&id),
        results,
    )?;
    Ok((id, warnings))
}

fn note_failures(
    repo: &Repository,
    warnings: &mut Vec<String>,
    name: &str,
    results: Vec<Result<crate::target::PutOutcome>>,
) -> Result<()> {
    let mut ok = 0;
    for (t, r) in repo.targets().iter().zip(results) {
        match r {
            Ok(_) => ok += 1,
            Err(e) => warnings.push(format!("target {}: {name}: {e}", t.name())),
        }
    }
    if ok == 0 {
        return Err(Error::Failed(format!(
            "{name} could not be stored on any target: {}",
            warnings.join("; ")
        )));
    }
    Ok(())
}

/// The partitions of a record snapshot's tree (`/<collection>/<partition>`).
pub async fn partitions(
    repo: &Repository,
    blob_index: &Index,
    root: &Id,
) -> Result<Vec<PartInput>> {
    let mut out = Vec::new();
    for coll in repo.load_tree(blob_index, root).await? {
        let Some(ct) = coll.subtree.filter(|_| coll.kind == NodeKind::Dir) else {
            continue;
        };
        for part in repo.load_tree(blob_index, &ct).await? {
            if let Some(pt) = part.subtree.filter(|_| part.kind == NodeKind::Dir) {
                out.push(PartInput {
                    collection: coll.name.clone(),
                    partition: part.name.clone(),
                    tree: pt,
                    nodes: None,
                    records: None,
                });
            }
        }
    }
    Ok(out)
}

/// Every record of a snapshot naming one of `wanted` (customer keys), from its
/// index (or, for a snapshot without one, from its trees): (collection,
/// partition tree, record).
pub async fn records_of(
    repo: &Repository,
    blob_index: &Index,
    snapshot: &crate::snapshot::Snapshot,
    wanted: &BTreeSet<String>,
    part_cache: &mut HashMap<Id, PartDoc>,
) -> Result<Vec<(String, Id, PartRecord)>> {
    let parts: Vec<(String, Id, Option<Id>)> = match snapshot.customer_index {
        Some(doc) => match repo
            .load_object::<CustomerObject>(ObjectKind::Customer, &doc)
            .await?
        {
            CustomerObject::Index { parts } => parts
                .into_iter()
                .map(|p| (p.collection, p.tree, Some(p.part)))
                .collect(),
            CustomerObject::Part(_) => {
                return Err(Error::corrupt(
                    ObjectKind::Customer.name(&doc),
                    "a snapshot's customer index names a part object",
                ))
            }
        },
        None => partitions(repo, blob_index, &snapshot.tree)
            .await?
            .into_iter()
            .map(|p| (p.collection, p.tree, None))
            .collect(),
    };
    let mut out = Vec::new();
    for (collection, tree, part) in parts {
        if let std::collections::hash_map::Entry::Vacant(e) = part_cache.entry(tree) {
            let doc = match part {
                Some(id) => match repo
                    .load_object::<CustomerObject>(ObjectKind::Customer, &id)
                    .await?
                {
                    CustomerObject::Part(p) if p.tree == tree => p,
                    _ => {
                        return Err(Error::corrupt(
                            ObjectKind::Customer.name(&id),
                            "not the part of the partition that names it",
                        ))
                    }
                },
                None => build_part(repo.keys(), tree, &repo.load_tree(blob_index, &tree).await?),
            };
            e.insert(doc);
        }
        for r in &part_cache[&tree].records {
            if r.customers.iter().any(|c| wanted.contains(c)) {
                out.push((collection.clone(), tree, r.clone()));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The suppression ledger

/// Suppress or lift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionAction {
    Suppress,
    Lift,
}

/// `suppressions/<id>`: one ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionDoc {
    /// The customer key (never the identifier).
    pub customer: String,
    pub action: SuppressionAction,
    pub time: DateTime<Utc>,
    pub reason: String,
}

/// The suppressed customer keys (latest entry per key decides), and the
/// active legal holds, which win: a held record is never filtered out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suppressed {
    keys: BTreeSet<String>,
    holds: Vec<crate::disposal::HoldDoc>,
}

impl Suppressed {
    /// Load the ledger (union over targets).
    pub async fn load(repo: &Repository) -> Result<Suppressed> {
        let mut latest: BTreeMap<String, SuppressionDoc> = BTreeMap::new();
        for id in repo.list_ids(ObjectKind::Suppression).await? {
            // An unreadable entry must not silently resurrect a customer.
            let doc: SuppressionDoc = repo.load_object(ObjectKind::Suppression, &id).await?;
            match latest.get(&doc.customer) {
                Some(prev) if prev.time > doc.time => {}
                _ => {
                    latest.insert(doc.customer.clone(), doc);
                }
            }
        }
        let keys: BTreeSet<String> = latest
            .into_values()
            .filter(|d| d.action == SuppressionAction::Suppress)
            .map(|d| d.customer)
            .collect();
        let holds = if keys.is_empty() {
            Vec::new()
        } else {
            crate::disposal::active_holds(repo).await?
        };
        Ok(Suppressed { keys, holds })
    }

    /// No customer is suppressed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of suppressed customers.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Is this customer key suppressed?
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Is this record node of `source` left out: it names a suppressed
    /// customer and no legal hold covers it?
    pub fn covers(&self, keys: &Keys, source: &str, node: &Node) -> bool {
        if self.keys.is_empty()
            || node.kind != NodeKind::Record
            || !node_keys(keys, node).iter().any(|k| self.keys.contains(k))
        {
            return false;
        }
        let collection = node
            .meta
            .get(keys::COLLECTION)
            .map(String::as_str)
            .unwrap_or("");
        !self
            .holds
            .iter()
            .any(|h| h.covers(source, collection, node))
    }

    /// The same for a record arriving from a connector (before it is stored).
    pub fn covers_record(
        &self,
        keys: &Keys,
        source: &str,
        collection: &str,
        kind: &str,
        raw_ids: &[String],
    ) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let mut n = Node::new(b"incoming", NodeKind::Record);
        n.meta
            .insert(keys::COLLECTION.into(), collection.to_string());
        n.meta.insert(keys::KIND.into(), kind.to_string());
        n.meta.insert(
            keys::CUSTOMER_IDS.into(),
            serde_json::to_string(raw_ids).expect("strings serialize"),
        );
        self.covers(keys, source, &n)
    }
}

/// Append a ledger entry on every target.
pub async fn write_suppression(repo: &Repository, doc: &SuppressionDoc) -> Result<Id> {
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Suppression, doc)
        .await;
    for (t, r) in repo.targets().iter().zip(results) {
        r.map_err(|e| {
            Error::Failed(format!(
                "target {}: the suppression ledger entry could not be written: {e}",
                t.name()
            ))
        })?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_normalize_by_type() {
        for (raw, want) in [
            ("Ana@Example.ORG", "email:ana@example.org"),
            ("email: <Ana@Example.org>", "email:ana@example.org"),
            ("+351 912-345-678", "phone:+351912345678"),
            ("00351 (91) 234 5678", "phone:+351912345678"),
            ("phone:+1 (415) 555-0100", "phone:+14155550100"),
            ("crm:hubspot:123", "crm:hubspot:123"),
            ("zendesk:9", "zendesk:9"),
        ] {
            assert_eq!(normalize(raw).unwrap(), want, "{raw}");
        }
        for bad in ["", "ana", "phone:12", "email:@x", "phone:+12ab", "email:"] {
            let e = normalize(bad).unwrap_err().to_string();
            assert!(e.contains("customer identifier"), "{bad}: {e}");
        }
    }

    #[test]
    fn mentions_count_only_when_recorded() {
        let found = crate::records::mentioned_emails(
            "Hi (cc Ana@Example.org), see <bo@example.org>; not@localhost or @x.y. bo@example.org!",
        );
        assert_eq!(found, vec!["email:ana@example.org", "email:bo@example.org"]);
        let mut n = Node::new(b"r.json", NodeKind::Record);
        n.meta.insert(
            keys::CUSTOMER_IDS.into(),
            serde_json::to_string(&["email:cy@example.org"]).unwrap(),
        );
        assert_eq!(node_identifiers(&n), vec!["email:cy@example.org"]);
        n.meta.insert(
            keys::MENTIONED_IDS.into(),
            serde_json::to_string(&found).unwrap(),
        );
        assert_eq!(
            node_identifiers(&n),
            vec![
                "email:ana@example.org",
                "email:bo@example.org",
                "email:cy@example.org"
            ]
        );
    }

    #[test]
    fn aliases_link_identifiers_both_ways() {
        let a = Aliases::new(&[(
            "ana".into(),
            vec!["ana@example.org".into(), "+351912345678".into()],
        )])
        .unwrap();
        let both: BTreeSet<String> = ["email:ana@example.org", "phone:+351912345678"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(a.resolve("ana").unwrap(), both);
        assert_eq!(a.resolve("ANA@example.org").unwrap(), both);
        assert_eq!(
            a.resolve("bo@example.org")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["email:bo@example.org".to_string()]
        );
        let e = Aliases::new(&[("x".into(), vec!["nope".into()])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[customer]] \"x\"") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn parts_list_only_records_naming_customers() {
        let keys = Keys::derive(&crate::crypto::MasterKey::generate());
        let rec = |id: &str, ids: &[&str]| {
            let mut n = Node::new(format!("{id}.json").as_bytes(), NodeKind::Record);
            n.meta.insert(keys::RECORD_ID.into(), id.into());
            n.meta.insert(keys::KIND.into(), "chat_message".into());
            if !ids.is_empty() {
                n.meta.insert(
                    keys::CUSTOMER_IDS.into(),
                    serde_json::to_string(ids).unwrap(),
                );
            }
            n
        };
        let nodes = vec![
            rec("1", &["email:Ana@example.org"]),
            rec("2", &[]),
            rec("3", &["phone:+351 91 234 5678", "email:bo@example.org"]),
        ];
        let part = build_part(&keys, Id([7; 32]), &nodes);
        assert_eq!(part.records.len(), 2);
        assert_eq!(
            part.records[0].customers,
            vec![keys.customer_key("email:ana@example.org")]
        );
        assert_eq!(part.records[1].customers.len(), 2);
        let mut s = Suppressed {
            keys: [keys.customer_key("email:bo@example.org")]
                .into_iter()
                .collect(),
            holds: Vec::new(),
        };
        assert!(s.covers(&keys, "chat", &nodes[2]));
        assert!(!s.covers(&keys, "chat", &nodes[0]));
        assert!(s.covers_record(
            &keys,
            "chat",
            "general",
            "chat_message",
            &["BO@example.org".into()]
        ));
        // A legal hold wins over the suppression.
        s.holds.push(crate::disposal::HoldDoc {
            name: "case".into(),
            action: crate::disposal::HoldAction::Place,
            time: Utc::now(),
            reason: "litigation".into(),
            customer: Some("bo@example.org".into()),
            source: Some("chat".into()),
            kind: None,
            collection: None,
            from: None,
            until: None,
        });
        assert!(!s.covers(&keys, "chat", &nodes[2]));
        assert!(s.covers(&keys, "mail", &nodes[2]));
    }
}
