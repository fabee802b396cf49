//! Finding records by their tree metadata (customer, time, kind), without
//! downloading a single body.

use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::id::Id;
use crate::index::Index;
use crate::records::keys;
use crate::repo::Repository;
use crate::tree::{Node, NodeKind};

/// What to look for; every given condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A customer identifier: typed (`email:ana@example.org`, `phone:+351…`)
    /// or bare (an address or number matches any type).
    pub customer: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub kind: Option<String>,
}

impl Filter {
    /// Does this record node match?
    pub fn matches(&self, node: &Node) -> bool {
        let created = node
            .meta
            .get(keys::CREATED)
            .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
            .map(|t| t.with_timezone(&Utc));
        if let Some(since) = self.since {
            if created.is_none_or(|c| c < since) {
                return false;
            }
        }
        if let Some(until) = self.until {
            if created.is_none_or(|c| c >= until) {
                return false;
            }
        }
        if let Some(kind) = &self.kind {
            if node.meta.get(keys::KIND) != Some(kind) {
                return false;
            }
        }
        if let Some(want) = &self.customer {
            let ids: Vec<String> = node
                .meta
                .get(keys::CUSTOMER_IDS)
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            let want = want.trim().to_lowercase();
            let hit = ids.iter().any(|id| {
                let id = id.to_lowercase();
                id == want || id.split_once(':').is_some_and(|(_, v)| v == want)
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// All record nodes under `tree` matching `filter`, with their paths.
pub async fn records(
    repo: &Repository,
    index: &Index,
    tree: Id,
    filter: &Filter,
) -> Result<Vec<(String, Node)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), tree)];
    while let Some((dir, t)) = stack.pop() {
        for n in repo.load_tree(index, &t).await? {
            let path = if dir.is_empty() {
                n.name.clone()
            } else {
                format!("{dir}/{}", n.name)
            };
            match n.kind {
                NodeKind::Dir => stack.extend(n.subtree.map(|s| (path, s))),
                NodeKind::Record if filter.matches(&n) => out.push((path, n)),
                _ => {}
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
