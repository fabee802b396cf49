//! One run of one job: the library operations called directly on the
//! repository the daemon holds open. Nothing here schedules, retries or
//! counts; that is `daemon/mod.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::backup::{self, BackupOptions, ParentMode, Progress};
use crate::check;
use crate::error::Error;
use crate::id::Id;
use crate::prune::PruneOptions;
use crate::records::RecordBackupOptions;
use crate::repo::Repository;
use crate::settings::{Settings, SourceSettings};

use super::config::{JobKind, JobSpec, PruneParams};

/// How a run ended (the `outcome` label of `custos_job_runs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Everything succeeded.
    Ok,
    /// Committed, but some source items were unreadable or a target lags
    /// (the exit codes 3 and 4 of the command line).
    Partial,
    /// Failed.
    Error,
    /// Abandoned after the job's `timeout`.
    Timeout,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Partial,
        Outcome::Error,
        Outcome::Timeout,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// What one run did.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub outcome: Outcome,
    /// One line for the log (names, counts; never content).
    pub summary: String,
    /// Problems, one per line (failed sources, lagging targets, check errors …).
    pub problems: Vec<String>,
    /// Targets found lagging by a backup or sync (`None`: the job does not tell).
    pub lagging: Option<BTreeSet<String>>,
    /// Backup jobs: what each source's run stored.
    pub sources: Vec<SourceRun>,
}

/// What one source's backup stored (`custos_backup_bytes_uploaded_total`,
/// `custos_backup_records_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRun {
    pub source: String,
    /// Sealed bytes of new blobs times the targets that received them.
    pub bytes_uploaded: u64,
    /// Records fetched and stored (new or changed); files for directory sources.
    pub records: u64,
}

impl JobResult {
    fn error(e: impl std::fmt::Display) -> JobResult {
        JobResult {
            outcome: Outcome::Error,
            summary: "failed".into(),
            problems: vec![e.to_string()],
            lagging: None,
            sources: Vec::new(),
        }
    }
}

/// What a run works with.
#[derive(Debug, Clone, Copy)]
pub struct JobEnv<'a> {
    /// The config in force when the run started.
    pub settings: &'a Settings,
    /// The repository without the metadata cache (check, prune, forget, sync, verify).
    pub repo: &'a Repository,
    /// The repository with the metadata cache (backups).
    pub cached: &'a Repository,
    /// Recorded in snapshots.
    pub hostname: &'a str,
}

/// Run `spec` once.
///
/// The future is not `Send` (some library futures trip the compiler's
/// "not general enough" limitation), so the daemon polls runs on its own task
/// rather than spawning them; the heavy work inside runs on the blocking pool.
pub async fn run(env: JobEnv<'_>, spec: &JobSpec) -> JobResult {
    let destructive = matches!(
        spec.kind,
        JobKind::Forget { .. } | JobKind::Prune(_) | JobKind::RetentionApply { .. }
    );
    let mut r = run_kind(env, spec).await;
    // A deletion that did not reach every target is not a clean run: the
    // unreachable ones still hold what was removed (the next sync deletes it).
    if destructive && !env.repo.unreachable().is_empty() {
        if r.outcome == Outcome::Ok {
            r.outcome = Outcome::Partial;
        }
        for (t, e) in env.repo.unreachable() {
            r.problems.push(format!(
                "target {t} unreachable ({e}): it still holds what this run removed"
            ));
        }
        r.lagging = Some(
            env.repo
                .unreachable()
                .iter()
                .map(|(t, _)| t.clone())
                .collect(),
        );
    }
    r
}

async fn run_kind(env: JobEnv<'_>, spec: &JobSpec) -> JobResult {
    match &spec.kind {
        JobKind::Backup { sources } => backup_sources(env, sources).await,
        JobKind::Forget { prune } => forget(env, *prune).await,
        JobKind::Prune(p) => prune(env, *p).await,
        JobKind::Sync => sync(env).await,
        JobKind::Check { read_data } => check(env, *read_data).await,
        JobKind::RestoreVerify {
            sources,
            sample_percent,
            against_source,
        } => restore_verify(env, sources, *sample_percent, *against_source).await,
        JobKind::RetentionApply { prune } => retention_apply(env, *prune).await,
        JobKind::LockExtend => lock_extend(env).await,
    }
}

async fn retention_apply(env: JobEnv<'_>, then_prune: Option<PruneParams>) -> JobResult {
    let Some(policy) = env.settings.record_retention.as_ref() else {
        return JobResult::error(crate::error::Error::Config(
            "retention_apply needs a [record_retention] section".into(),
        ));
    };
    match crate::disposal::apply(env.repo, policy, chrono::Utc::now(), false).await {
        Ok(r) => {
            let removed: u64 = r.removed.iter().map(|c| c.records).sum();
            let summary = format!(
                "removed {removed} record copy(ies) from {} snapshot(s); {} kept under hold",
                r.snapshots_rewritten, r.held
            );
            match then_prune {
                None => JobResult {
                    outcome: Outcome::Ok,
                    summary,
                    problems: Vec::new(),
                    lagging: None,
                    sources: Vec::new(),
                },
                Some(p) => {
                    let mut r = prune(env, p).await;
                    r.summary = format!("{summary}; {}", r.summary);
                    r
                }
            }
        }
        Err(e) => JobResult::error(e),
    }
}

/// The time zone recorded for a source: its own, the repository's, else UTC
/// (never the machine's `TZ`).
fn time_zone(settings: &Settings, source_tz: Option<&String>) -> String {
    source_tz
        .cloned()
        .or_else(|| settings.repository.time_zone.clone())
        .unwrap_or_else(|| "UTC".into())
}

/// This machine's name, recorded in snapshots (as `custos backup`).
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn backup_sources(env: JobEnv<'_>, only: &[String]) -> JobResult {
    let chosen: Vec<&SourceSettings> = env
        .settings
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|n| n == s.name()))
        .collect();
    if chosen.is_empty() {
        return JobResult::error("no configured source to back up");
    }
    let mut problems = Vec::new();
    let mut done = Vec::new();
    let mut runs = Vec::new();
    let mut lagging = BTreeSet::new();
    let (mut failed, mut partial) = (0usize, false);
    // Sources run at once (each connector within its own rate limit), four
    // at a time; results are taken in config order.
    let results: Vec<(String, crate::error::Result<crate::backup::BackupReport>)> = {
        use futures::StreamExt as _;
        futures::stream::iter(chosen.into_iter().map(|s| async move {
            let name = s.name().to_string();
            let progress = Arc::new(Progress::default());
            let result = match s {
                SourceSettings::Directory {
                    paths,
                    tags,
                    time_zone: tz,
                    exclude,
                    ..
                } => {
                    let opts = BackupOptions {
                        source: name.clone(),
                        paths: paths.clone(),
                        tags: tags.clone(),
                        hostname: env.hostname.to_string(),
                        time_zone: time_zone(env.settings, tz.as_ref()),
                        parent: ParentMode::Auto,
                        exclude: exclude.clone(),
                    };
                    backup::backup(env.cached, &opts, progress).await
                }
                SourceSettings::Records {
                    config,
                    mode,
                    tags,
                    time_zone: tz,
                    reconcile_every,
                    index_mentions,
                    jurisdiction,
                    ..
                } => {
                    let opts = RecordBackupOptions {
                        source: name.clone(),
                        source_type: config.source_type().to_string(),
                        mode: *mode,
                        tags: tags.clone(),
                        hostname: env.hostname.to_string(),
                        time_zone: time_zone(env.settings, tz.as_ref()),
                        reconcile_every: reconcile_every
                            .and_then(|d| chrono::Duration::from_std(d).ok()),
                        full: false,
                        index_mentions: *index_mentions,
                        jurisdiction: jurisdiction.clone(),
                        state_memory: crate::records::STATE_MEMORY,
                    };
                    match custos_connectors::config::build(config) {
                        Ok(connector) => {
                            crate::records::backup_records(
                                env.cached,
                                connector.as_ref(),
                                &opts,
                                progress,
                            )
                            .await
                        }
                        Err(e) => Err(Error::Config(format!("source {name}: {e}"))),
                    }
                }
            };
            (name, result)
        }))
        .buffered(4)
        .collect()
        .await
    };
    for (name, result) in results {
        match result {
            Ok(report) => {
                done.push(format!("{name}: snapshot {}", report.id.short()));
                let sum = &report.snapshot.summary;
                runs.push(SourceRun {
                    source: name.clone(),
                    bytes_uploaded: sum.bytes_stored * report.committed.len() as u64,
                    // One pair is zero: directory sources count files, record sources records.
                    records: sum.files_new
                        + sum.files_changed
                        + sum.records_new
                        + sum.records_changed,
                });
                if let Some((path, e)) = report.unreadable.first() {
                    partial = true;
                    problems.push(format!(
                        "source {name}: {} item(s) unreadable, skipped (first: {path}: {e})",
                        report.unreadable.len()
                    ));
                }
                for (t, e) in &report.lagging {
                    partial = true;
                    lagging.insert(t.clone());
                    problems.push(format!("source {name}: target {t} lags: {e}"));
                }
            }
            Err(e) => {
                failed += 1;
                problems.push(format!("source {name}: {e}"));
            }
        }
    }
    let outcome = if failed > 0 {
        Outcome::Error
    } else if partial {
        Outcome::Partial
    } else {
        Outcome::Ok
    };
    let lagging = (failed == 0).then(|| {
        // Targets left out at open lag too (the backup reports them, but be explicit).
        lagging.extend(env.repo.unreachable().iter().map(|(t, _)| t.clone()));
        lagging
    });
    JobResult {
        outcome,
        summary: if done.is_empty() {
            "no snapshot".into()
        } else {
            done.join(", ")
        },
        problems,
        lagging,
        sources: runs,
    }
}

async fn forget(env: JobEnv<'_>, then_prune: Option<PruneParams>) -> JobResult {
    let Some(retention) = &env.settings.retention else {
        return JobResult::error("kind forget needs a [retention] section");
    };
    let (snaps, warnings) = match env.repo.snapshots().await {
        Ok(v) => v,
        Err(e) => return JobResult::error(e),
    };
    let mut problems: Vec<String> = warnings
        .into_iter()
        .map(|w| format!("skipping damaged snapshot: {w}"))
        .collect();
    // Legal holds keep what they cover (inside `plan`).
    let groups = match crate::forget::plan(
        env.repo,
        &snaps,
        &retention.policy,
        chrono::Utc::now(),
        &retention.group_by,
        false,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => return JobResult::error(e),
    };
    let remove: Vec<Id> = groups
        .iter()
        .flat_map(|g| g.removed().filter_map(|d| Id::from_hex(&d.id)))
        .collect();
    let removal = match crate::forget::remove(env.repo, &remove).await {
        Ok(r) => r,
        Err(e) => return JobResult::error(e),
    };
    let failures = removal.failures;
    let mut summary = format!(
        "removed {} snapshot(s)",
        remove.len() - failures.len() - removal.locked.len()
    );
    if !removal.locked.is_empty() {
        summary.push_str(&format!(", {} kept by Object Lock", removal.locked.len()));
    }
    let held = groups
        .iter()
        .flat_map(|g| &g.decisions)
        .filter(|d| {
            d.reasons
                .iter()
                .any(|r| matches!(r, custos_schedules::retention::Reason::Hold { .. }))
        })
        .count();
    if held > 0 {
        summary.push_str(&format!(", {held} kept under legal hold"));
    }
    if !failures.is_empty() {
        problems.extend(failures);
        return JobResult {
            outcome: Outcome::Error,
            summary,
            problems,
            lagging: None,
            sources: Vec::new(),
        };
    }
    match then_prune {
        None => JobResult {
            outcome: Outcome::Ok,
            summary,
            problems,
            lagging: None,
            sources: Vec::new(),
        },
        Some(p) => {
            let mut r = prune(env, p).await;
            r.summary = format!("{summary}; {}", r.summary);
            problems.append(&mut r.problems);
            r.problems = problems;
            r
        }
    }
}

async fn prune(env: JobEnv<'_>, p: PruneParams) -> JobResult {
    let opts = PruneOptions {
        grace: p.grace,
        repack_threshold: p.repack_threshold / 100.0,
        dry_run: false,
        ..Default::default()
    };
    // Pending erasures whose locks ran out are completed with the prune.
    match crate::erasures::prune_completing(env.repo, &opts, chrono::Utc::now()).await {
        Ok((r, erasures)) => {
            audit_completions(env, &erasures).await;
            let mut problems = r.errors;
            problems.extend(erasures.errors.iter().cloned());
            let mut summary = format!(
                "marked {} pack(s), repacked {}, deleted {} ({} bytes freed)",
                r.packs_marked, r.packs_repacked, r.packs_deleted, r.bytes_freed
            );
            if erasures.open > 0 {
                summary.push_str(&format!(
                    "; {} of {} pending erasure(s) completed",
                    erasures.completed.len(),
                    erasures.open
                ));
            }
            if erasures.disposals_open > 0 {
                summary.push_str(&format!(
                    "; {} of {} pending retention disposal(s) completed",
                    erasures.disposals_completed.len(),
                    erasures.disposals_open
                ));
            }
            JobResult {
                outcome: if problems.is_empty() {
                    Outcome::Ok
                } else {
                    Outcome::Error
                },
                summary,
                problems,
                lagging: None,
                sources: Vec::new(),
            }
        }
        Err(e) => JobResult::error(e),
    }
}

/// One audit entry per erasure a prune job completed (the job's own entry
/// follows from the daemon).
async fn audit_completions(env: JobEnv<'_>, r: &crate::erasures::RetryReport) {
    let operator = std::env::var("CUSTOS_OPERATOR")
        .ok()
        .or_else(|| env.settings.repository.operator.clone())
        .unwrap_or_else(|| "custos daemon".into());
    for e in r.all_completed() {
        let word = match e.kind {
            crate::erasures::Tracked::Erasure => "erasure",
            crate::erasures::Tracked::Disposal => "disposal",
        };
        let action = crate::audit::Action {
            command: format!("{word} complete"),
            subjects: vec![format!("{word}:{}", e.id)],
            outcome: "ok".into(),
            counts: [("objects_removed".to_string(), e.removed.len() as u64)]
                .into_iter()
                .collect(),
        };
        let actor = crate::audit::Actor::current(Some(&operator));
        if let Err(err) = crate::audit::append(env.repo, &actor, action).await {
            tracing::warn!(id = %e.id, kind = word, error = %err, "audit entry not written");
        }
    }
}

async fn lock_extend(env: JobEnv<'_>) -> JobResult {
    match crate::locks::extend(env.repo, false).await {
        Ok(r) => JobResult {
            outcome: if r.errors() == 0 {
                Outcome::Ok
            } else {
                Outcome::Error
            },
            summary: format!(
                "extended {} object lock(s)",
                r.targets.iter().map(|t| t.extended).sum::<usize>()
            ),
            problems: r.targets.into_iter().flat_map(|t| t.errors).collect(),
            lagging: None,
            sources: Vec::new(),
        },
        Err(e) => JobResult::error(e),
    }
}

async fn sync(env: JobEnv<'_>) -> JobResult {
    match crate::sync::sync(env.repo, false).await {
        Ok(r) => {
            let mut failed = r.failed.clone();
            failed.extend(env.repo.unreachable().iter().cloned());
            let copied: usize = r.copied.iter().map(|(_, n, _)| n).sum();
            JobResult {
                outcome: if failed.is_empty() {
                    Outcome::Ok
                } else {
                    Outcome::Partial
                },
                summary: format!("copied {copied} object(s)"),
                problems: failed
                    .iter()
                    .map(|(t, e)| format!("target {t} still lags: {e}"))
                    .collect(),
                lagging: Some(failed.into_iter().map(|(t, _)| t).collect()),
                sources: Vec::new(),
            }
        }
        Err(e) => JobResult::error(e),
    }
}

async fn check(env: JobEnv<'_>, read: check::ReadData) -> JobResult {
    let mut problems = Vec::new();
    let mut checked = 0;
    for t in env.repo.targets() {
        match check::check(&env.repo.only(t), read).await {
            Ok(r) => {
                checked += 1;
                problems.extend(r.errors.iter().map(|e| format!("target {}: {e}", r.target)));
            }
            Err(e) => problems.push(format!("target {}: {e}", t.name())),
        }
    }
    for (t, e) in env.repo.unreachable() {
        problems.push(format!("target {t} unreachable, not checked: {e}"));
    }
    JobResult {
        outcome: if problems.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Error
        },
        summary: format!("checked {checked} target(s)"),
        problems,
        lagging: None,
        sources: Vec::new(),
    }
}

async fn restore_verify(
    env: JobEnv<'_>,
    sources: &[String],
    sample_percent: Option<f64>,
    against_source: Option<usize>,
) -> JobResult {
    let opts = crate::verify::VerifyOptions {
        sources: sources.to_vec(),
        sample_percent,
        against_source,
        configured: env.settings.sources.clone(),
        ..Default::default()
    };
    // No cache: every read must come from the target being verified.
    match crate::verify::run(env.repo, &opts).await {
        Ok(report) => {
            let ok = report.ok();
            JobResult {
                outcome: if ok { Outcome::Ok } else { Outcome::Error },
                summary: if ok {
                    "verified".into()
                } else {
                    format!("{} failure(s)", report.failure_count())
                },
                problems: report.failure_lines(),
                lagging: None,
                sources: Vec::new(),
            }
        }
        Err(e) => JobResult::error(e),
    }
}
