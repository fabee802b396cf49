//! `custos daemon`: runs the config's `[[job]]`s on cron schedules
//! (tokio-cron-scheduler), serves `/metrics`, `/healthz` and `/readyz`, and
//! handles SIGTERM/SIGINT (graceful stop) and SIGHUP (config reload).
//!
//! - [`config`]: `[daemon]` and `[[job]]` validation (every bad key fails at
//!   start-up, naming the job and the key).
//! - [`jobs`]: one run of one job, calling the library operations directly on
//!   the repository opened at start (re-opened on SIGHUP).
//! - [`http`]: the endpoints and the Prometheus text.
//! - [`alerts`]: webhooks (generic JSON, Slack) and healthchecks-style pings.
//!
//! Besides the jobs, a monitor task probes every target and checks each
//! source's RPO every `check_every` (and lists each target's objects every
//! `stats_every` for the stored bytes): it feeds `custos_target_up`,
//! `custos_target_stored_bytes` and the condition alerts.
//!
//! The schedule arithmetic (cron specs, catch-up, no-overlap bookkeeping) is
//! pure and lives in `custos_schedules::cron`.
//!
//! Runs: a fire while the job's previous run still runs is skipped and counted
//! (`custos_job_skipped_total`); `jitter` delays each run by a random
//! `0..=jitter`; `timeout` abandons a run. Abandoning a run (timeout, or
//! shutdown after `shutdown_grace`) is safe because of the repository's commit
//! order (packs → index → snapshot): an abandoned backup leaves only packs no
//! index references, which `check` reports as warnings and prune removes.
//!
//! The daemon opens the repository with the configured password, i.e. with
//! full repository access; keys limited to a role (backup-only) come with the
//! customer-rights work.
//!
//! State: the end time of each job's last successful run is kept in
//! `<cache dir>/<repository id>/daemon-state.json`, only to decide catch-up
//! runs at start and to report `custos_job_last_success_timestamp_seconds`
//! across restarts. It is a local optimization: losing it only means a missed
//! run is not caught up at the next start.

pub mod alerts;
pub mod config;
pub mod http;
pub mod jobs;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use custos_schedules::cron::{catch_up_due, Overlap};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::repo::{Repository, CONFIG_OBJECT};
use crate::settings::{SecretSource, Settings};
use crate::target::cache::Cached;
use crate::target::limit::Limited;
use crate::target::store::StoreTarget;
use crate::target::TargetRef;

use self::alerts::{Conditions, Event as Alert, EventKind, Notifier, State};
use self::config::{DaemonConfig, JobSpec};
use self::http::Metrics;
use self::jobs::{JobEnv, JobResult, Outcome};

/// Targets left out at open (unreachable) are retried at most this often, before a job.
const REOPEN_INTERVAL: Duration = Duration::from_secs(300);
/// How long `/readyz` waits for each target.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Name of the state file inside `<cache dir>/<repository id>/`.
pub const STATE_FILE: &str = "daemon-state.json";

/// `custos daemon` arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// Validate the config (`[daemon]`, `[[job]]`, schedules) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// What the daemon needs from the command line.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// The config file (read again on SIGHUP).
    pub config_path: PathBuf,
    /// The password source from the command line or environment; else the config's.
    pub password: Option<SecretSource>,
    /// `--cache-dir` (else the config's `cache_dir`, `$XDG_CACHE_HOME/custos`, `~/.cache/custos`).
    pub cache_dir: Option<PathBuf>,
    /// `--no-cache`: no metadata cache (the state file is still kept under the cache dir).
    pub no_cache: bool,
    /// `--target`: only these configured targets.
    pub only_targets: Vec<String>,
    /// `--limit-upload` / `--limit-download`, KiB/s per target.
    pub limit_upload_kib: Option<u64>,
    pub limit_download_kib: Option<u64>,
}

/// How the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Runs still going when the grace period ended (abandoned).
    pub abandoned: usize,
}

/// Read and validate the config file for the daemon.
pub fn load_config(path: &Path) -> Result<(Settings, DaemonConfig)> {
    let settings = Settings::load(path)?;
    let config = config::validate(&settings)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok((settings, config))
}

/// The config and the repository opened with it.
#[derive(Debug)]
struct Loaded {
    settings: Arc<Settings>,
    config: Arc<DaemonConfig>,
    /// Without the metadata cache.
    repo: Repository,
    /// With the metadata cache (backups), or the same as `repo`.
    cached: Repository,
    /// Every configured target (uncached), for `/readyz`.
    probes: Vec<TargetRef>,
    state_path: Option<PathBuf>,
    opened_at: Instant,
}

fn cache_root(opts: &DaemonOptions, settings: &Settings) -> Option<PathBuf> {
    opts.cache_dir
        .clone()
        .or_else(|| settings.repository.cache_dir.clone())
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("custos")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/custos")))
}

/// Every job must be allowed for the key the daemon holds: a backup-only
/// sidecar is given a backup key, and a job it may not run fails start-up,
/// naming the job, instead of failing at 3 a.m.
fn check_roles(config: &DaemonConfig, repo: &Repository) -> Result<()> {
    for job in &config.jobs {
        let needed = job.kind.role_needed();
        if repo.role() < needed {
            return Err(Error::Config(format!(
                "[[job]] {:?} (kind {}) needs {}, but the daemon's key {} is a {} key: \
                 give this daemon that key's password, or run the job from a daemon that holds one",
                job.name,
                job.kind.label(),
                needed.key_phrase(),
                repo.key_id().short(),
                repo.role()
            )));
        }
    }
    Ok(())
}

/// Open the configured targets and the repository on them.
async fn open(
    opts: &DaemonOptions,
    settings: Arc<Settings>,
    config: Arc<DaemonConfig>,
) -> Result<Loaded> {
    if settings.targets.is_empty() {
        return Err(Error::Config("the config file has no [[target]]".into()));
    }
    for n in &opts.only_targets {
        if !settings.targets.iter().any(|t| &t.name == n) {
            return Err(Error::Invalid(format!(
                "--target {n}: no such target in the config"
            )));
        }
    }
    let mut targets: Vec<TargetRef> = Vec::new();
    for t in settings
        .targets
        .iter()
        .filter(|t| opts.only_targets.is_empty() || opts.only_targets.contains(&t.name))
    {
        let store = StoreTarget::open(&t.name, &t.url, &t.s3_options()?, false)?;
        let mut limits = t.limits;
        if let Some(k) = opts.limit_upload_kib {
            limits.upload_bps = Some(k * 1024);
        }
        if let Some(k) = opts.limit_download_kib {
            limits.download_bps = Some(k * 1024);
        }
        targets.push(Limited::wrap(Arc::new(store), limits));
    }
    let source = opts
        .password
        .clone()
        .or_else(|| settings.repository.password.clone())
        .ok_or_else(|| {
            Error::Password(
                "no password: set [repository] password_file / password_env / password_command, \
                 CUSTOS_PASSWORD, --password-file or --password-command"
                    .into(),
            )
        })?;
    let password = zeroize::Zeroizing::new(source.resolve()?);
    let (mut repo, empty) = Repository::open(targets.clone(), password.as_bytes()).await?;
    drop(password);
    check_roles(&config, &repo)?;
    for t in &empty {
        repo.mark_unreachable(
            t.name(),
            "holds no repository (wrong bucket or prefix? run `custos init` with this config to add it)".into(),
        );
    }
    let root = cache_root(opts, &settings);
    let dir = root.as_ref().map(|r| r.join(repo.config().id.to_hex()));
    let cached = match (&dir, opts.no_cache) {
        (Some(dir), false) => repo.with_targets(
            repo.targets()
                .iter()
                .map(|t| Cached::wrap(t.clone(), dir.clone(), settings.repository.cache_max_bytes))
                .collect(),
        ),
        _ => repo.clone(),
    };
    Ok(Loaded {
        state_path: dir.map(|d| d.join(STATE_FILE)),
        settings,
        config,
        repo,
        cached,
        probes: targets,
        opened_at: Instant::now(),
    })
}

/// The persisted state (a local optimization; see the module docs).
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// Per job: when its last successful run finished.
    #[serde(default)]
    last_success: BTreeMap<String, DateTime<Utc>>,
}

fn read_state(path: &Path) -> StateFile {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "daemon state file unreadable; starting without it");
            StateFile::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "daemon state file unreadable; starting without it");
            StateFile::default()
        }
    }
}

fn write_state(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).expect("state serializes"),
    )?;
    std::fs::rename(&tmp, path)
}

/// Run bookkeeping: no overlap, and no new run once stopping.
#[derive(Debug, Default)]
struct Runs {
    overlap: Overlap,
    stopping: bool,
}

/// Everything the scheduler callbacks, the runs and the HTTP server share.
#[derive(Debug)]
pub struct Shared {
    opts: DaemonOptions,
    current: RwLock<Arc<Loaded>>,
    runs: Mutex<Runs>,
    /// Number of runs in progress (updated under the `runs` lock).
    running: watch::Sender<usize>,
    /// `true` once stopping: runs waiting for their jitter give up.
    stop: watch::Sender<bool>,
    metrics: Mutex<Metrics>,
    /// Serializes reloads and re-opens.
    reopen: tokio::sync::Mutex<()>,
    hostname: String,
    /// Sends alerts and pings.
    notifier: Notifier,
    /// Conditions currently firing.
    conditions: Mutex<Conditions>,
    started: Instant,
    /// Due jobs, to the main loop.
    requests: mpsc::UnboundedSender<(String, &'static str)>,
}

/// Work the main loop polls: job runs and reloads. Not `Send` (see
/// [`jobs::run`]), hence polled on the daemon's own task, never spawned.
type Task = futures::future::LocalBoxFuture<'static, Event>;

/// What a [`Task`] ends with.
enum Event {
    RunDone,
    Reloaded(Box<Result<Loaded>>),
}

impl Shared {
    fn new(
        opts: DaemonOptions,
        loaded: Loaded,
        requests: mpsc::UnboundedSender<(String, &'static str)>,
    ) -> Shared {
        Shared {
            requests,
            opts,
            current: RwLock::new(Arc::new(loaded)),
            runs: Mutex::default(),
            running: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            metrics: Mutex::default(),
            reopen: tokio::sync::Mutex::new(()),
            hostname: jobs::hostname(),
            notifier: Notifier::default(),
            conditions: Mutex::default(),
            started: Instant::now(),
        }
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().expect("current lock").clone()
    }

    fn replace(&self, loaded: Loaded) {
        *self.current.write().expect("current lock") = Arc::new(loaded);
    }

    /// Take the persisted last-success times into the metrics.
    fn load_state(&self) {
        let loaded = self.current();
        if let Some(p) = &loaded.state_path {
            let state = read_state(p);
            self.metrics.lock().expect("metrics lock").last_success = state.last_success;
        }
    }

    fn save_state(&self, loaded: &Loaded) {
        let Some(path) = &loaded.state_path else {
            return;
        };
        let state = StateFile {
            last_success: self
                .metrics
                .lock()
                .expect("metrics lock")
                .last_success
                .clone(),
        };
        if let Err(e) = write_state(path, &state) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the daemon state file");
        }
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let loaded = self.current();
        let overlap = self.runs.lock().expect("runs lock").overlap.clone();
        let mut m = self.metrics.lock().expect("metrics lock").clone();
        m.deliveries = self.notifier.counts();
        http::render(&m, &overlap, &loaded.config.jobs, Utc::now())
    }

    /// `/readyz`: the config in force is valid (it always is: an invalid one is
    /// never taken) and every configured target answers for its `config` object.
    pub async fn readiness(&self) -> (bool, String) {
        if *self.stop.borrow() {
            return (false, "stopping\n".into());
        }
        let loaded = self.current();
        let mut body = format!("config ok ({} job(s))\n", loaded.config.jobs.len());
        let probes = loaded.probes.iter().map(|t| async move {
            let r = tokio::time::timeout(PROBE_TIMEOUT, t.get(CONFIG_OBJECT)).await;
            let verdict = match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
            };
            (t.name().to_string(), verdict)
        });
        let mut ready = true;
        for (name, verdict) in futures::future::join_all(probes).await {
            match verdict {
                Ok(()) => body.push_str(&format!("target {name}: ok\n")),
                Err(e) => {
                    ready = false;
                    body.push_str(&format!("target {name}: unreachable: {e}\n"));
                }
            }
        }
        (ready, body)
    }

    /// A job came due (`why`: schedule, catch-up): hand it to the main loop,
    /// which starts it (see `Shared::start_run`).
    pub fn trigger(&self, name: &str, why: &'static str) {
        // A closed channel means the daemon is stopping: nothing to start.
        let _ = self.requests.send((name.to_string(), why));
    }

    /// Start a run of `name` unless one is running (then the fire is skipped
    /// and counted), the job no longer exists, or the daemon stops. The
    /// returned future performs the run and its bookkeeping; the main loop polls it.
    fn start_run(self: &Arc<Self>, name: &str, why: &'static str) -> Option<Task> {
        let loaded = self.current();
        let spec = loaded.config.job(name)?.clone();
        {
            let mut runs = self.runs.lock().expect("runs lock");
            if runs.stopping {
                return None;
            }
            if !runs.overlap.try_start(name) {
                tracing::info!(
                    job = name,
                    skipped = runs.overlap.skipped(name),
                    "previous run still running; this run is skipped"
                );
                return None;
            }
            self.running.send_replace(runs.overlap.running_count());
        }
        let me = self.clone();
        Some(Box::pin(async move {
            use futures::FutureExt as _;
            let name = spec.name.clone();
            // A panic ends the run, not the daemon or the bookkeeping.
            let run = std::panic::AssertUnwindSafe(me.run_one(spec, why)).catch_unwind();
            if run.await.is_err() {
                tracing::error!(job = %name, "job run panicked");
                me.record(&name, Outcome::Error, 0.0, None);
            }
            let mut runs = me.runs.lock().expect("runs lock");
            runs.overlap.finish(&name);
            me.running.send_replace(runs.overlap.running_count());
            Event::RunDone
        }))
    }

    async fn run_one(self: &Arc<Self>, spec: JobSpec, why: &'static str) {
        if let Some(max) = spec.jitter.filter(|d| !d.is_zero()) {
            let delay = max.mul_f64(rand::random::<f64>());
            let mut stop = self.stop.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        self.reopen_if_targets_missing().await;
        let loaded = self.current();
        let env = JobEnv {
            settings: &loaded.settings,
            repo: &loaded.repo,
            cached: &loaded.cached,
            hostname: &self.hostname,
        };
        tracing::info!(job = %spec.name, kind = spec.kind.label(), trigger = why, "job started");
        if let Some(url) = &spec.ping {
            self.notifier
                .ping(&spec.name, url, "/start", format!("trigger: {why}\n"));
        }
        let started = Instant::now();
        let result = match spec.timeout {
            None => jobs::run(env, &spec).await,
            Some(limit) => match tokio::time::timeout(limit, jobs::run(env, &spec)).await {
                Ok(r) => r,
                Err(_) => JobResult {
                    outcome: Outcome::Timeout,
                    summary: format!(
                        "abandoned after {} (timeout)",
                        humantime::format_duration(limit)
                    ),
                    problems: Vec::new(),
                    lagging: None,
                    sources: Vec::new(),
                },
            },
        };
        let secs = started.elapsed().as_secs_f64();
        match result.outcome {
            Outcome::Ok => tracing::info!(
                job = %spec.name, outcome = "ok", seconds = secs, summary = %result.summary,
                "job finished"
            ),
            o => tracing::warn!(
                job = %spec.name, outcome = o.label(), seconds = secs, summary = %result.summary,
                problems = %result.problems.iter().take(10).cloned().collect::<Vec<_>>().join("; "),
                "job finished with problems"
            ),
        }
        self.record(&spec.name, result.outcome, secs, result.lagging.as_ref());
        self.record_sources(&spec.name, &result.sources);
        self.audit_run(&loaded, &spec, &result);
        if result.outcome == Outcome::Ok {
            self.save_state(&loaded);
        }
        self.announce_run(&loaded, &spec, &result, secs);
        self.refresh_snapshots(&loaded).await;
    }

    /// The run's entry in the repository's audit trail; the new head goes
    /// to `/metrics` and into every later alert (anchored outside the repository).
    ///
    /// Written from its own task: an abandoned upload may still hold the
    /// target's bandwidth, and the run's bookkeeping must not wait for it.
    fn audit_run(self: &Arc<Self>, loaded: &Loaded, spec: &JobSpec, result: &JobResult) {
        let mut counts = std::collections::BTreeMap::new();
        for s in &result.sources {
            *counts.entry("records".to_string()).or_insert(0) += s.records;
            *counts.entry("bytes_uploaded".to_string()).or_insert(0) += s.bytes_uploaded;
        }
        let action = crate::audit::Action {
            command: spec.kind.label().to_string(),
            subjects: vec![format!("job:{}", spec.name)],
            outcome: match result.outcome {
                Outcome::Ok => "ok".into(),
                o => format!("{}: {}", o.label(), result.summary),
            },
            counts,
        };
        let operator = std::env::var("CUSTOS_OPERATOR")
            .ok()
            .or_else(|| loaded.settings.repository.operator.clone())
            .unwrap_or_else(|| "custos daemon".into());
        let actor = crate::audit::Actor::current(Some(&operator));
        let (me, repo, job) = (self.clone(), loaded.repo.clone(), spec.name.clone());
        tokio::spawn(async move {
            match crate::audit::append(&repo, &actor, action).await {
                Ok(head) => me.metrics.lock().expect("metrics lock").audit_head = Some(head),
                Err(e) => tracing::warn!(job = %job, error = %e, "audit entry not written"),
            }
        });
    }

    /// Pings and alerts for a finished run.
    fn announce_run(&self, loaded: &Loaded, spec: &JobSpec, result: &JobResult, secs: f64) {
        if let Some(url) = &spec.ping {
            let mut body = format!(
                "{} in {secs:.1}s: {}\n",
                result.outcome.label(),
                result.summary
            );
            for p in &result.problems {
                body.push_str(p);
                body.push('\n');
            }
            let suffix = if result.outcome == Outcome::Ok {
                ""
            } else {
                "/fail"
            };
            self.notifier.ping(&spec.name, url, suffix, body);
        }
        if result.outcome == Outcome::Ok {
            return;
        }
        let verify = matches!(spec.kind, config::JobKind::RestoreVerify { .. });
        let mut e = self.event(
            loaded,
            if verify {
                EventKind::VerifyFailed
            } else {
                EventKind::JobFailed
            },
            State::Firing,
            format!(
                "job {} ({}) ended {}: {}",
                spec.name,
                spec.kind.label(),
                result.outcome.label(),
                result.summary
            ),
        );
        if result.outcome == Outcome::Partial {
            e.severity = "warning";
        }
        e.job = Some(spec.name.clone());
        e.outcome = Some(result.outcome.label().to_string());
        e.problems = result.problems.clone();
        self.notifier.alert(&loaded.config.alerts, &e);
    }

    /// An event about this daemon's repository, now.
    fn event(&self, loaded: &Loaded, kind: EventKind, state: State, summary: String) -> Alert {
        let severity = match kind {
            EventKind::TargetLagging | EventKind::Capacity => "warning",
            _ => "critical",
        };
        Alert {
            event: kind,
            state,
            severity,
            summary,
            problems: Vec::new(),
            job: None,
            outcome: None,
            source: None,
            target: None,
            repository: loaded.repo.config().id.short(),
            host: self.hostname.clone(),
            time: Utc::now(),
            audit_head: self
                .metrics
                .lock()
                .expect("metrics lock")
                .audit_head
                .clone(),
        }
    }

    /// Update a condition; announce it when it starts or ends.
    fn condition(
        &self,
        loaded: &Loaded,
        kind: EventKind,
        subject: &str,
        holds: bool,
        describe: impl FnOnce(State) -> Alert,
    ) {
        let change = self
            .conditions
            .lock()
            .expect("conditions lock")
            .update(kind, subject, holds);
        if let Some(state) = change {
            let e = describe(state);
            match state {
                State::Firing => {
                    tracing::warn!(event = kind.label(), subject, summary = %e.summary, "condition firing")
                }
                State::Resolved => {
                    tracing::info!(event = kind.label(), subject, "condition resolved")
                }
            }
            self.notifier.alert(&loaded.config.alerts, &e);
        }
    }

    /// Per-source counters of a backup run.
    fn record_sources(&self, job: &str, sources: &[jobs::SourceRun]) {
        let mut m = self.metrics.lock().expect("metrics lock");
        for s in sources {
            *m.backup_bytes
                .entry((job.to_string(), s.source.clone()))
                .or_default() += s.bytes_uploaded;
            *m.backup_records
                .entry((job.to_string(), s.source.clone()))
                .or_default() += s.records;
        }
    }

    /// The monitor: probe targets, list their sizes, check RPOs, every
    /// `check_every` until the daemon stops.
    async fn monitor(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut last_stats: Option<Instant> = None;
        loop {
            let loaded = self.current();
            let stats_due = last_stats.is_none_or(|t| t.elapsed() >= loaded.config.stats_every);
            if stats_due {
                last_stats = Some(Instant::now());
            }
            self.check_targets(&loaded, stats_due).await;
            self.refresh_snapshots(&loaded).await;
            self.check_rpo(&loaded);
            tokio::select! {
                _ = tokio::time::sleep(loaded.config.check_every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Resolve the conditions of subjects a reload removed from the config.
    fn drop_removed(&self, loaded: &Loaded) {
        let targets: std::collections::BTreeSet<String> =
            loaded.probes.iter().map(|t| t.name().to_string()).collect();
        let sources: std::collections::BTreeSet<String> = loaded
            .settings
            .sources
            .iter()
            .filter(|s| s.rpo().is_some())
            .map(|s| s.name().to_string())
            .collect();
        for (kind, keep) in [
            (EventKind::TargetDown, &targets),
            (EventKind::TargetLagging, &targets),
            (EventKind::Capacity, &targets),
            (EventKind::RpoBreach, &sources),
        ] {
            let gone = self
                .conditions
                .lock()
                .expect("conditions lock")
                .drop_others(kind, keep);
            for subject in gone {
                let what = if kind == EventKind::RpoBreach {
                    "source"
                } else {
                    "target"
                };
                let mut e = self.event(
                    loaded,
                    kind,
                    State::Resolved,
                    format!("{what} {subject} is no longer watched (removed from the config)"),
                );
                if kind == EventKind::RpoBreach {
                    e.source = Some(subject);
                } else {
                    e.target = Some(subject);
                }
                self.notifier.alert(&loaded.config.alerts, &e);
            }
        }
    }

    async fn check_targets(&self, loaded: &Loaded, stats_due: bool) {
        self.drop_removed(loaded);
        let probes = loaded.probes.iter().map(|t| async move {
            let up = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, t.get(CONFIG_OBJECT)).await,
                Ok(Ok(_))
            );
            let stored = if up && stats_due {
                match crate::sync::stored_bytes(t).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!(target = %t.name(), error = %e, "cannot list the target for its stored bytes");
                        None
                    }
                }
            } else {
                None
            };
            (t.name().to_string(), up, stored)
        });
        for (name, up, stored) in futures::future::join_all(probes).await {
            {
                let mut m = self.metrics.lock().expect("metrics lock");
                m.target_up.insert(name.clone(), up);
                if let Some(b) = stored {
                    m.target_stored.insert(name.clone(), b);
                }
            }
            self.condition(loaded, EventKind::TargetDown, &name, !up, |state| {
                let mut e = self.event(
                    loaded,
                    EventKind::TargetDown,
                    state,
                    match state {
                        State::Firing => format!("target {name} does not answer"),
                        State::Resolved => format!("target {name} answers again"),
                    },
                );
                e.target = Some(name.clone());
                e
            });
            let (Some(bytes), Some(&cap)) = (stored, loaded.config.capacity.get(&name)) else {
                continue;
            };
            self.condition(loaded, EventKind::Capacity, &name, bytes > cap, |state| {
                let mut e = self.event(
                    loaded,
                    EventKind::Capacity,
                    state,
                    format!("target {name} stores {bytes} bytes (capacity threshold {cap})"),
                );
                e.target = Some(name.clone());
                e
            });
        }
    }

    fn check_rpo(&self, loaded: &Loaded) {
        let newest = self
            .metrics
            .lock()
            .expect("metrics lock")
            .newest_snapshot
            .clone();
        let now = Utc::now();
        for s in &loaded.settings.sources {
            let Some(rpo) = s.rpo() else { continue };
            let name = s.name();
            let (breach, summary) = match newest.get(name) {
                Some(t) => {
                    let age = (now - *t).to_std().unwrap_or_default();
                    (
                        age > rpo,
                        format!(
                            "source {name}: newest snapshot is {} old (rpo {})",
                            humantime::format_duration(Duration::from_secs(age.as_secs())),
                            humantime::format_duration(rpo)
                        ),
                    )
                }
                // No snapshot yet: a breach once the daemon has run longer than the RPO.
                None => (
                    self.started.elapsed() > rpo,
                    format!(
                        "source {name}: no snapshot (rpo {})",
                        humantime::format_duration(rpo)
                    ),
                ),
            };
            self.condition(loaded, EventKind::RpoBreach, name, breach, |state| {
                let mut e = self.event(loaded, EventKind::RpoBreach, state, summary);
                e.source = Some(name.to_string());
                e
            });
        }
    }

    fn record(
        &self,
        job: &str,
        outcome: Outcome,
        secs: f64,
        lagging: Option<&std::collections::BTreeSet<String>>,
    ) {
        let loaded = self.current();
        let mut m = self.metrics.lock().expect("metrics lock");
        *m.runs
            .entry(job.to_string())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        m.last_duration.insert(job.to_string(), secs);
        if outcome == Outcome::Ok {
            m.last_success.insert(job.to_string(), Utc::now());
        }
        let Some(lagging) = lagging else { return };
        let names: Vec<String> = loaded
            .settings
            .targets
            .iter()
            .filter(|t| {
                self.opts.only_targets.is_empty() || self.opts.only_targets.contains(&t.name)
            })
            .map(|t| t.name.clone())
            .collect();
        for t in &names {
            m.target_lagging.insert(t.clone(), lagging.contains(t));
        }
        drop(m);
        for t in &names {
            let lags = lagging.contains(t);
            self.condition(&loaded, EventKind::TargetLagging, t, lags, |state| {
                let mut e = self.event(
                    &loaded,
                    EventKind::TargetLagging,
                    state,
                    match state {
                        State::Firing => format!(
                            "target {t} lags behind the others after job {job} (`custos sync` copies what it misses)"
                        ),
                        State::Resolved => format!("target {t} is up to date again"),
                    },
                );
                e.target = Some(t.clone());
                e
            });
        }
    }

    /// Newest snapshot per source, for `custos_snapshot_age_seconds`.
    async fn refresh_snapshots(&self, loaded: &Loaded) {
        match loaded.cached.snapshots().await {
            Ok((snaps, _)) => {
                let mut newest: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
                for s in snaps {
                    let e = newest
                        .entry(s.snapshot.source.clone())
                        .or_insert(s.snapshot.time);
                    if s.snapshot.time > *e {
                        *e = s.snapshot.time;
                    }
                }
                self.metrics.lock().expect("metrics lock").newest_snapshot = newest;
            }
            Err(e) => tracing::warn!(error = %e, "cannot list snapshots for the metrics"),
        }
    }

    /// Targets that failed at open are tried again (at most every
    /// [`REOPEN_INTERVAL`]); a failed re-open keeps the current repository.
    async fn reopen_if_targets_missing(&self) {
        let loaded = self.current();
        if loaded.repo.unreachable().is_empty() || loaded.opened_at.elapsed() < REOPEN_INTERVAL {
            return;
        }
        let Ok(_guard) = self.reopen.try_lock() else {
            return;
        };
        match open(&self.opts, loaded.settings.clone(), loaded.config.clone()).await {
            Ok(fresh) => {
                tracing::info!(
                    unreachable = fresh.repo.unreachable().len(),
                    "repository re-opened"
                );
                self.replace(fresh);
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-opening the repository failed; keeping the current one");
                // Do not retry before the interval passes again.
                let again = Loaded {
                    settings: loaded.settings.clone(),
                    config: loaded.config.clone(),
                    repo: loaded.repo.clone(),
                    cached: loaded.cached.clone(),
                    probes: loaded.probes.clone(),
                    state_path: loaded.state_path.clone(),
                    opened_at: Instant::now(),
                };
                self.replace(again);
            }
        }
    }

    /// Jobs due for a catch-up run at start.
    fn catch_up(self: &Arc<Self>) {
        let loaded = self.current();
        let now = Utc::now();
        let last = self
            .metrics
            .lock()
            .expect("metrics lock")
            .last_success
            .clone();
        for j in &loaded.config.jobs {
            let previous = last.get(&j.name).copied();
            if catch_up_due(&j.schedule, j.catch_up, previous, now) {
                tracing::info!(
                    job = %j.name,
                    last_success = %previous.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    "a run was missed while the daemon was down; running it now"
                );
                self.trigger(&j.name, "catch-up");
            }
        }
    }
}

/// The cron scheduler with the jobs of one config.
struct Schedule {
    scheduler: tokio_cron_scheduler::JobScheduler,
    jobs: Vec<tokio_cron_scheduler::Job>,
}

fn sched_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Failed(format!("scheduler: {what}: {e:?}"))
}

impl Schedule {
    async fn start(shared: &Arc<Shared>) -> Result<Schedule> {
        let scheduler = tokio_cron_scheduler::JobScheduler::new()
            .await
            .map_err(|e| sched_err("start", e))?;
        let mut s = Schedule {
            scheduler,
            jobs: Vec::new(),
        };
        s.add_jobs(shared).await?;
        s.scheduler
            .start()
            .await
            .map_err(|e| sched_err("start", e))?;
        Ok(s)
    }

    async fn add_jobs(&mut self, shared: &Arc<Shared>) -> Result<()> {
        let loaded = shared.current();
        for spec in &loaded.config.jobs {
            let name = spec.name.clone();
            let me = shared.clone();
            let job =
                tokio_cron_scheduler::Job::new_async(spec.schedule.normalized(), move |_, _| {
                    let (me, name) = (me.clone(), name.clone());
                    Box::pin(async move { me.trigger(&name, "schedule") })
                })
                .map_err(|e| {
                    // CronSpec validated the same spec with the same parser; this is a bug.
                    sched_err(
                        &format!(
                            "job {} schedule {:?}",
                            spec.name,
                            spec.schedule.normalized()
                        ),
                        e,
                    )
                })?;
            self.scheduler
                .add(job.clone())
                .await
                .map_err(|e| sched_err(&format!("add job {}", spec.name), e))?;
            self.jobs.push(job);
        }
        Ok(())
    }

    async fn replace_jobs(&mut self, shared: &Arc<Shared>) -> Result<()> {
        for job in self.jobs.drain(..) {
            self.scheduler
                .remove(&job.guid())
                .await
                .map_err(|e| sched_err("remove job", e))?;
        }
        self.add_jobs(shared).await
    }

    async fn stop(&mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = ?e, "scheduler shutdown");
        }
    }
}

/// SIGHUP, first half: read the config again and open the repository with it.
async fn load_fresh(opts: DaemonOptions) -> Result<Loaded> {
    let (settings, config) = load_config(&opts.config_path)?;
    open(&opts, Arc::new(settings), Arc::new(config)).await
}

/// SIGHUP, second half: take the fresh config, or keep the previous one when
/// it is invalid (or the repository does not open with it) and log why.
async fn apply_reload(shared: &Arc<Shared>, schedule: &mut Schedule, fresh: Result<Loaded>) {
    let path = shared.opts.config_path.display().to_string();
    let old = shared.current();
    match fresh {
        Err(e) => {
            tracing::error!(
                config = %path,
                error = %e,
                "config reload failed; keeping the previous config"
            );
        }
        Ok(fresh) => {
            if fresh.config.listen != old.config.listen {
                tracing::warn!(
                    listen = %fresh.config.listen,
                    serving = %old.config.listen,
                    "[daemon] listen changes only at restart"
                );
            }
            let jobs = fresh.config.jobs.len();
            shared.replace(fresh);
            match schedule.replace_jobs(shared).await {
                Ok(()) => tracing::info!(config = %path, jobs, "config reloaded"),
                Err(e) => tracing::error!(error = %e, "rescheduling after reload failed"),
            }
        }
    }
}

/// Run the daemon until SIGTERM or SIGINT. Fails at start on an invalid
/// config, a repository that does not open, or an address that cannot be bound.
///
/// Job runs are polled here, on the caller's task (their futures are not
/// `Send`); the scheduler and the HTTP server run on their own tasks.
pub async fn run(opts: DaemonOptions) -> Result<Stopped> {
    use futures::StreamExt as _;
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k: SignalKind| {
        signal(k).map_err(|e| Error::Failed(format!("cannot install signal handler: {e}")))
    };
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    let (settings, config) = load_config(&opts.config_path)?;
    let loaded = open(&opts, Arc::new(settings), Arc::new(config)).await?;
    let listen: SocketAddr = loaded.config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config(format!("[daemon] listen {listen}: {e}")))?;
    let (requests, mut due) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared::new(opts, loaded, requests));
    shared.load_state();
    tokio::spawn(http::serve(listener, shared.clone()));
    tokio::spawn(shared.clone().monitor());
    let mut schedule = Schedule::start(&shared).await?;
    {
        let loaded = shared.current();
        tracing::info!(
            listen = %listen,
            jobs = loaded.config.jobs.len(),
            repository = %loaded.repo.config().id.short(),
            "daemon started"
        );
        for (t, e) in loaded.repo.unreachable() {
            tracing::warn!(target = %t, error = %e, "target unreachable at start; retried before jobs");
        }
    }
    let mut tasks: futures::stream::FuturesUnordered<Task> = Default::default();
    shared.catch_up();

    let mut reloading = false;
    let signal_name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                if reloading {
                    tracing::info!("SIGHUP: a reload is already in progress");
                } else {
                    reloading = true;
                    let opts = shared.opts.clone();
                    let guard_owner = shared.clone();
                    tasks.push(Box::pin(async move {
                        let _guard = guard_owner.reopen.lock().await;
                        Event::Reloaded(Box::new(load_fresh(opts).await))
                    }));
                }
            }
            Some((name, why)) = due.recv() => {
                if let Some(task) = shared.start_run(&name, why) {
                    tasks.push(task);
                }
            }
            Some(event) = tasks.next(), if !tasks.is_empty() => {
                if let Event::Reloaded(fresh) = event {
                    reloading = false;
                    apply_reload(&shared, &mut schedule, *fresh).await;
                }
            }
        }
    };

    // Stop taking work, then give running jobs the grace period.
    let running = {
        let mut runs = shared.runs.lock().expect("runs lock");
        runs.stopping = true;
        runs.overlap.running_count()
    };
    shared.stop.send_replace(true);
    due.close();
    schedule.stop().await;
    let grace = shared.current().config.shutdown_grace;
    tracing::info!(
        signal = signal_name,
        running,
        grace = %humantime::format_duration(grace),
        "stopping: no new runs; waiting for running jobs"
    );
    let drain = async {
        while let Some(event) = tasks.next().await {
            if let Event::Reloaded(fresh) = event {
                // Too late to matter; say so rather than drop it silently.
                if let Err(e) = *fresh {
                    tracing::info!(error = %e, "reload finished while stopping");
                }
            }
        }
    };
    let _ = tokio::time::timeout(grace, drain).await;
    let abandoned = *shared.running.borrow();
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "grace period over: abandoning running jobs (an abandoned backup leaves only \
             unreferenced packs; nothing is half-committed)"
        );
    } else {
        tracing::info!("stopped");
    }
    Ok(Stopped { abandoned })
}
