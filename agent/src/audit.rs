//! The audit trail: who did what with the archive, hash-chained.
//!
//! Every state-changing or data-reading command appends one entry (who — OS
//! user, configured operator, host —, when, what, outcome, counts; never
//! content or secrets). Entries are immutable sealed objects named
//! `audit/<seq>-<hash>`: `seq` (20 digits) is one more than the highest
//! sequence number among the entry's predecessors, `hash` the BLAKE3 of the
//! stored bytes, as for every object. Each entry names its predecessors (the
//! current heads: entries no other entry names), so the log is a hash chain;
//! two writers appending at once make a fork (two entries with one `seq`),
//! which `audit log` shows and the next append merges by naming both.
//!
//! `audit verify` detects an altered entry (bytes that do not hash to the
//! name, or fail authentication), a removed one (a predecessor that does not
//! exist), a reordered one (a sequence number that is not one more than its
//! predecessors'), and, given the head anchored outside the repository
//! (`--head`, printed by `audit head`, exported by the daemon as a metric and
//! sent with every alert), a truncated tail.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::{open_object, seal_object, ObjectKind};
use crate::repo::Repository;

/// What happened (the caller's part of an entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The command or daemon job kind (`backup`, `restore`, `customer erase` …).
    pub command: String,
    /// What it worked on: snapshot ids, source and target names, a customer
    /// key — never content, identifiers or secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// `ok`, or `error: …`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
}

/// Who did it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// The configured operator name (`[repository] operator`, `CUSTOS_OPERATOR`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operator: String,
    pub os_user: String,
    pub host: String,
}

impl Actor {
    /// This process: the OS user, the host, and `operator`.
    pub fn current(operator: Option<&str>) -> Actor {
        Actor {
            operator: operator.unwrap_or_default().to_string(),
            os_user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| {
                    // No login variables (containers): the numeric uid.
                    std::fs::read_to_string("/proc/self/status")
                        .ok()
                        .and_then(|s| {
                            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| {
                                l.split_whitespace().nth(1).map(|u| format!("uid {u}"))
                            })
                        })
                        .unwrap_or_default()
                }),
            host: crate::daemon::jobs::hostname(),
        }
    }
}

/// The sealed document of an `audit/<seq>-<hash>` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// Predecessors (the heads when it was written); empty for the first entry.
    pub prev: Vec<String>,
    pub time: DateTime<Utc>,
    pub actor: Actor,
    pub action: Action,
}

/// `audit/<seq>-<hash>` → (seq, hash).
fn parse_name(name: &str) -> Option<(u64, Id)> {
    let base = name.rsplit('/').next()?;
    let (seq, hash) = base.split_once('-')?;
    if seq.len() != 20 {
        return None;
    }
    Some((seq.parse().ok()?, Id::from_hex(hash)?))
}

fn object_name(seq: u64, id: &Id) -> String {
    format!("{}/{seq:020}-{id}", ObjectKind::Audit.folder())
}

/// An entry's reference: `<seq>-<hash>`.
pub fn reference(seq: u64, id: &Id) -> String {
    format!("{seq:020}-{id}")
}

/// Entry references listed on any target.
async fn listed(repo: &Repository) -> Result<BTreeSet<(u64, Id)>> {
    let mut out = BTreeSet::new();
    let mut ok = false;
    let mut first_err = None;
    for t in repo.targets() {
        match t.list(&format!("{}/", ObjectKind::Audit.folder())).await {
            Ok(list) => {
                ok = true;
                out.extend(list.iter().filter_map(|m| parse_name(&m.name)));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if !ok {
        return Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())));
    }
    Ok(out)
}

async fn load(repo: &Repository, seq: u64, id: &Id) -> Result<Entry> {
    let name = object_name(seq, id);
    let keys = repo.keys().clone();
    let id = *id;
    repo.read_verified(&name, move |b| {
        open_object(&keys, ObjectKind::Audit, &id, b)
    })
    .await
}

/// The folder prefix every entry of sequence number `seq` or higher sorts
/// after (`audit/<seq, 20 digits>` is shorter than their names).
fn seq_floor(seq: u64) -> String {
    format!("{}/{seq:020}", ObjectKind::Audit.folder())
}

/// Entry references with sequence number `from` or higher on any target:
/// one listing per target that starts there (S3 `StartAfter`).
async fn listed_from(repo: &Repository, from: u64) -> Result<BTreeSet<(u64, Id)>> {
    let prefix = format!("{}/", ObjectKind::Audit.folder());
    let mut out = BTreeSet::new();
    let mut ok = false;
    let mut first_err = None;
    for t in repo.targets() {
        match t.list_after(&prefix, &seq_floor(from), None).await {
            Ok(list) => {
                ok = true;
                out.extend(list.iter().filter_map(|m| parse_name(&m.name)));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if !ok {
        return Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())));
    }
    Ok(out)
}

/// The highest sequence number on `t` (None: no entry), by probing listings
/// of one object each: doubling steps from `from`, then bisection — about
/// 2·log2(entries) requests, never a listing of the whole folder.
async fn top_on(t: &crate::target::TargetRef, from: u64) -> Result<Option<u64>> {
    let prefix = format!("{}/", ObjectKind::Audit.folder());
    let exists = |seq: u64| {
        let prefix = prefix.clone();
        async move {
            Ok::<bool, Error>(
                t.list_after(&prefix, &seq_floor(seq), Some(1))
                    .await?
                    .iter()
                    .any(|m| parse_name(&m.name).is_some()),
            )
        }
    };
    let mut lo = from;
    if !exists(lo).await? {
        if lo == 0 {
            return Ok(None);
        }
        lo = 0;
        if !exists(0).await? {
            return Ok(None);
        }
    }
    // exists(lo); find hi with !exists(hi).
    let mut step = 1u64;
    let mut hi = lo.saturating_add(step);
    while exists(hi).await? {
        lo = hi;
        step = step.saturating_mul(2);
        hi = lo.saturating_add(step);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid).await? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Sequence numbers known to be at or below the top of each repository's
/// log (by repository id): where the next append of this process starts
/// listing. Only a starting point: a wrong one costs requests, not correctness.
static HINTS: std::sync::Mutex<BTreeMap<Id, u64>> = std::sync::Mutex::new(BTreeMap::new());

/// The starting point of the next append or `heads` in this process.
pub fn hint(repo: &Repository) -> Option<u64> {
    HINTS
        .lock()
        .expect("hints lock")
        .get(&repo.config().id)
        .copied()
}

/// Remember `seq` (an entry known to exist, e.g. kept in a local cache
/// across runs) as the starting point of the next append or `heads`.
pub fn set_hint(repo: &Repository, seq: u64) {
    HINTS
        .lock()
        .expect("hints lock")
        .insert(repo.config().id, seq);
}

/// The current heads: the entries of the highest sequence number, found
/// without listing the whole folder — from the hint when one is known
/// (one listing, of the entries since), else by probing. Every entry with
/// the top sequence number is listed, so a fork is always seen.
async fn current_heads(repo: &Repository) -> Result<Vec<(u64, Id)>> {
    let mut from = None;
    if let Some(h) = hint(repo) {
        let l = listed_from(repo, h).await?;
        if !l.is_empty() {
            from = Some((h, l));
        }
    }
    let all = match from {
        Some((_, l)) => l,
        None => {
            let mut top: Option<u64> = None;
            let mut ok = false;
            let mut first_err = None;
            for t in repo.targets() {
                match top_on(t, hint(repo).unwrap_or(0)).await {
                    Ok(v) => {
                        ok = true;
                        top = top.max(v);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if !ok {
                return Err(
                    first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into()))
                );
            }
            match top {
                Some(t) => listed_from(repo, t).await?,
                None => BTreeSet::new(),
            }
        }
    };
    let top = all.iter().map(|(s, _)| *s).max();
    Ok(match top {
        Some(t) => all.iter().filter(|(s, _)| *s == t).copied().collect(),
        None => Vec::new(),
    })
}

/// Append an entry after the current heads (the entries of the highest
/// sequence number: a fork left by concurrent writers is merged here).
/// Returns its reference. Written to every target; a target that fails is
/// reported in the error only when none took it. Lists only the entries
/// from the last known head on (see `current_heads`), not the whole log.
pub async fn append(repo: &Repository, actor: &Actor, action: Action) -> Result<String> {
    let heads = current_heads(repo).await?;
    append_after(repo, &heads, actor, action).await
}

/// Write an entry naming `heads` as its predecessors.
async fn append_after(
    repo: &Repository,
    heads: &[(u64, Id)],
    actor: &Actor,
    action: Action,
) -> Result<String> {
    let top = heads.iter().map(|(s, _)| *s).max();
    let entry = Entry {
        seq: top.map_or(0, |t| t + 1),
        prev: heads.iter().map(|(s, id)| reference(*s, id)).collect(),
        time: Utc::now(),
        actor: actor.clone(),
        action,
    };
    let (id, bytes) = seal_object(repo.keys(), ObjectKind::Audit, &entry);
    let name = object_name(entry.seq, &id);
    let results = repo.put_to(repo.targets(), &name, &bytes).await;
    let errors: Vec<String> = repo
        .targets()
        .iter()
        .zip(results)
        .filter_map(|(t, r)| r.err().map(|e| format!("{}: {e}", t.name())))
        .collect();
    if errors.len() == repo.targets().len() {
        return Err(Error::Failed(format!(
            "no target took it: {}",
            errors.join("; ")
        )));
    }
    set_hint(repo, entry.seq);
    Ok(reference(entry.seq, &id))
}

/// The log, oldest first, with the damage found on the way.
#[derive(Debug, Default, Serialize)]
pub struct Log {
    pub entries: Vec<(String, Entry)>,
    /// The current heads (more than one: a fork not merged yet).
    pub heads: Vec<String>,
    /// Sequence numbers written by more than one entry (forks; merged when a
    /// later entry names all of them).
    pub forks: Vec<u64>,
    /// Everything `verify` objects to, naming the entry.
    pub problems: Vec<String>,
}

/// Load and check the whole log. With `anchor` (a head recorded outside the
/// repository earlier), also check that it is still there and that nothing
/// older than the current heads was cut off after it.
pub async fn verify(repo: &Repository, anchor: Option<&str>) -> Result<Log> {
    let all = listed(repo).await?;
    let mut log = Log::default();
    let mut by_ref: HashMap<String, Entry> = HashMap::new();
    for (seq, id) in &all {
        let r = reference(*seq, id);
        match load(repo, *seq, id).await {
            Ok(e) if e.seq != *seq => log.problems.push(format!(
                "entry {r}: its name says sequence {seq}, its content {} (renamed or reordered)",
                e.seq
            )),
            Ok(e) => {
                by_ref.insert(r, e);
            }
            Err(e) => log
                .problems
                .push(format!("entry {r}: altered or unreadable: {e}")),
        }
    }
    let mut named: BTreeSet<String> = BTreeSet::new();
    let mut per_seq: BTreeMap<u64, usize> = BTreeMap::new();
    let mut refs: Vec<&String> = by_ref.keys().collect();
    refs.sort();
    for r in refs {
        let e = &by_ref[r];
        *per_seq.entry(e.seq).or_default() += 1;
        if e.seq == 0 && !e.prev.is_empty() {
            log.problems
                .push(format!("entry {r}: first entry names predecessors"));
        }
        if e.seq > 0 && e.prev.is_empty() {
            log.problems.push(format!(
                "entry {r}: sequence {} without a predecessor (a second chain)",
                e.seq
            ));
        }
        let mut max_prev = None;
        for p in &e.prev {
            named.insert(p.clone());
            match by_ref.get(p) {
                Some(pe) => max_prev = Some(max_prev.map_or(pe.seq, |m: u64| m.max(pe.seq))),
                None => log.problems.push(format!(
                    "entry {r}: its predecessor {p} is missing (removed)"
                )),
            }
        }
        if let Some(m) = max_prev {
            if e.seq != m + 1 {
                log.problems.push(format!(
                    "entry {r}: sequence {} after predecessors up to {m} (reordered)",
                    e.seq
                ));
            }
        }
    }
    log.forks = per_seq
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    let mut entries: Vec<(String, Entry)> = by_ref.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    log.heads = entries
        .iter()
        .filter(|(r, _)| !named.contains(r))
        .map(|(r, _)| r.clone())
        .collect();
    if let Some(a) = anchor {
        let known = entries.iter().any(|(r, _)| r == a) || named.contains(a);
        if !entries.iter().any(|(r, _)| r == a) {
            log.problems.push(format!(
                "the anchored head {a} is {} (the log was cut back)",
                if known {
                    "referenced but missing"
                } else {
                    "not in the log"
                }
            ));
        }
    }
    log.entries = entries;
    Ok(log)
}

/// The current head(s), from listings only, without listing the whole log
/// (cheap: for anchoring after every command and in the daemon's metrics).
pub async fn heads(repo: &Repository) -> Result<Vec<String>> {
    let heads = current_heads(repo).await?;
    if let Some((s, _)) = heads.first() {
        set_hint(repo, *s);
    }
    Ok(heads.iter().map(|(s, id)| reference(*s, id)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let id = Id([3; 32]);
        let name = object_name(42, &id);
        assert!(name.starts_with("audit/00000000000000000042-"));
        assert_eq!(parse_name(&name), Some((42, id)));
        assert_eq!(parse_name("audit/42-abc"), None);
    }
}

#[cfg(test)]
mod append_tests {
    use super::*;
    use std::sync::Arc;

    use crate::target::recording::Recording;
    use crate::target::store::StoreTarget;
    use crate::target::TargetRef;

    /// (objects returned by listings of `audit/`, listings of the whole folder)
    /// since the last call.
    fn audit_listings(r: &Recording) -> (usize, usize) {
        let calls: Vec<_> = (r.take().into_iter())
            .filter(|c| c.object.starts_with("audit"))
            .collect();
        let listed = calls.iter().map(|c| c.listed).sum();
        let full = calls.iter().filter(|c| c.op == "list").count();
        (listed, full)
    }

    fn action(n: usize) -> Action {
        Action {
            command: format!("test {n}"),
            outcome: "ok".into(),
            ..Default::default()
        }
    }

    fn forget_hint(repo: &Repository) {
        HINTS.lock().unwrap().remove(&repo.config().id);
    }

    #[tokio::test]
    async fn appends_list_a_bounded_number_of_entries_and_forks_still_show() {
        let c = Arc::new(Recording::new(Arc::new(StoreTarget::memory("m"))));
        let t: TargetRef = c.clone();
        let repo = crate::erasures::tests::repo_on(t).await;
        let actor = Actor::current(Some("tester"));
        let n = 600;
        for i in 0..n {
            append(&repo, &actor, action(i)).await.unwrap();
        }
        audit_listings(&c);
        // With the head known from this process's last append: the entries
        // from there on, i.e. one object.
        let r = append(&repo, &actor, action(n)).await.unwrap();
        assert!(r.starts_with(&format!("{n:020}-")), "{r}");
        assert_eq!(audit_listings(&c), (1, 0));
        // A fresh process (no hint): probes of one object each, about
        // 2·log2(n), never the whole folder.
        forget_hint(&repo);
        let r = append(&repo, &actor, action(n + 1)).await.unwrap();
        assert!(r.starts_with(&format!("{:020}-", n + 1)), "{r}");
        let (listed, full) = audit_listings(&c);
        assert_eq!(full, 0);
        assert!(
            listed <= 2 * 10 + 2,
            "{listed} objects listed for 602 entries"
        );
        // A stale hint (beyond the top: entries were cut) falls back to probing.
        set_hint(&repo, 10_000);
        let r = append(&repo, &actor, action(n + 2)).await.unwrap();
        assert!(r.starts_with(&format!("{:020}-", n + 2)), "{r}");
        // `heads` is just as cheap.
        audit_listings(&c);
        assert_eq!(heads(&repo).await.unwrap(), vec![r.clone()]);
        assert_eq!(audit_listings(&c), (1, 0));

        // Two writers at once: both read the same head, both write the next
        // sequence number — a fork, which the next append (from either
        // writer's hint) sees whole and merges.
        let h1 = current_heads(&repo).await.unwrap();
        let h2 = current_heads(&repo).await.unwrap();
        let a = append_after(&repo, &h1, &actor, action(1)).await.unwrap();
        let b = append_after(&repo, &h2, &Actor::current(Some("other")), action(2))
            .await
            .unwrap();
        assert_eq!(a[..20], b[..20], "one sequence number: {a} {b}");
        assert_ne!(a, b);
        set_hint(&repo, n as u64 + 3);
        let merged = append(&repo, &actor, action(3)).await.unwrap();
        let log = verify(&repo, Some(&merged)).await.unwrap();
        assert!(log.problems.is_empty(), "{:?}", log.problems);
        assert_eq!(log.forks, vec![n as u64 + 3]);
        assert_eq!(log.heads, vec![merged.clone()]);
        let last = &log.entries.last().unwrap().1;
        let mut prev = last.prev.clone();
        prev.sort();
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(prev, both, "the merge names both sides of the fork");
        // Verify still reads everything.
        assert_eq!(log.entries.len(), n + 3 + 2 + 1);
    }
}
